"""Staying up: graceful interrupts, checkpoints that are never half-used, memory preflight.

* :class:`InterruptCallback`: SIGINT/SIGTERM during training finish the current optimizer step,
  write a checkpoint and stop; the run then exits non-zero with a message saying how to resume.
  A second signal falls back to the default handler (immediate exit).
* :class:`CheckpointMarkerCallback`: after the Trainer has written *all* of ``checkpoint-N``
  (model, optimizer, scheduler, RNG, trainer state), it writes ``checkpoint-N/.complete``
  (fsynced) holding the size and hash of every file, then deletes checkpoints beyond
  ``--save_total_limit``. :func:`preftune.rundir.find_latest_checkpoint` considers only
  checkpoints that verify against their marker, so neither a process killed in the middle of a
  save nor a file damaged later leaves a checkpoint that ``--resume_from_checkpoint latest``
  would pick up.
* :func:`memory_preflight`: one forward + backward pass on the largest batch the run can see,
  before the first step, so that an out-of-memory error happens in the first minute with a
  message that suggests the fix, not hours later.
"""

from __future__ import annotations

import dataclasses
import logging
import signal

import torch
from transformers import TrainerCallback

from .errors import PreftuneError
from .launch import agree_on_signal, current_launch
from .rundir import CheckpointOrigin, checkpoint_path
from .saving import discard_unusable_checkpoints_after, mark_checkpoint_complete, rotate_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["InterruptCallback", "CheckpointMarkerCallback", "memory_preflight", "largest_batch"]


class InterruptCallback(TrainerCallback):
    """Turn SIGINT/SIGTERM into "save a checkpoint at the end of this step, then stop".

    In a multi-process run every process learns at the end of each optimizer step whether any
    process received a signal (:func:`preftune.launch.agree_on_signal`), so all stop after the same
    step and save one checkpoint together, whichever of them the signal reached. Only process 0
    logs that it is stopping."""

    def __init__(self):
        self.received: int | None = None
        self.main_process = True
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        self.received = signum
        if self.main_process:
            logger.warning("received %s: finishing this step, saving a checkpoint, then stopping (send again to abort now)", signal.Signals(signum).name)
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def on_train_begin(self, args, state, control, **kwargs):
        self.main_process = state.is_world_process_zero
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep default behaviour
            self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        # Decide on the agreed value alone, never on self.received read again afterwards: a signal
        # landing between the all-reduce and that read would make this process save while the
        # others train on, and both would wait for each other forever. Such a signal is agreed on
        # at the next step's end.
        seen_here = self.received
        agreed = agree_on_signal(seen_here, args.device)
        if agreed is None:
            return control
        if seen_here is None:  # another process received it
            self.received = self.received or agreed
            if self.main_process:
                logger.warning("another process received %s: saving a checkpoint after this step, then stopping", signal.Signals(agreed).name)
        control.should_save = True
        control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class CheckpointMarkerCallback(TrainerCallback):
    """Mark ``checkpoint-N`` complete once everything in it has been written, then rotate old ones.

    ``on_save`` runs after ``Trainer._save_checkpoint`` wrote model, optimizer, scheduler, RNG and
    trainer state. All processes first meet at a barrier (each writes its own ``rng_state_<rank>.pth``
    and, under FSDP/DeepSpeed, its shards), then process 0 writes the manifest marker
    (:func:`preftune.saving.mark_checkpoint_complete`) and deletes checkpoints beyond ``keep_last``
    (:func:`preftune.saving.rotate_checkpoints`). When training starts (or resumes at step K),
    damaged or incomplete checkpoints newer than K are removed, since the run writes them again
    and writers read what they find in place. :class:`preftune.trainer.PreferenceTrainer` adds
    this callback itself and switches off transformers' own rotation, which would run before the
    marker.
    """

    def __init__(self, keep_last: int | None = None):
        self.keep_last = keep_last

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # nothing is being written yet: no process can race this
            discard_unusable_checkpoints_after(args.output_dir, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if state.is_world_process_zero:
            step = state.global_step
            launch = current_launch(args.world_size)
            origin = CheckpointOrigin(launch.world_size, launch.nodes, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                      args.max_tokens_per_batch, launch.launcher)
            if mark_checkpoint_complete(checkpoint_path(args.output_dir, step), step, dataclasses.asdict(origin)):
                rotate_checkpoints(args.output_dir, self.keep_last, step, protect=state.best_model_checkpoint)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def largest_batch(pairs, batch_size: int, max_tokens_per_batch: int | None = None):
    """The ``batch_size`` longest pairs (or, by token budget, the longest pairs that fit it,
    filled by the same greedy rule as the token-budget sampler). Reads only the length array
    of :class:`preftune.data.store.TokenizedPairs` (a list is converted), then builds those pairs."""
    import numpy as np

    from .data.store import as_tokenized_pairs

    pairs = as_tokenized_pairs(pairs)
    if not len(pairs):
        return []
    lengths = pairs.lengths()
    ordered = np.argsort(-lengths, kind="stable")  # longest first, ties by index
    if max_tokens_per_batch is None:
        return [pairs[int(i)] for i in ordered[:batch_size]]
    from .sampling import token_budget_batches

    head = ordered[: max(1, int(np.searchsorted(np.cumsum(lengths[ordered]), max_tokens_per_batch, side="right")) + 1)]
    first = token_budget_batches(lengths[head].tolist(), max_tokens_per_batch, list(range(len(head))))[0]
    return [pairs[int(head[i])] for i in first]


def _recompute_advice(args) -> str:
    """The recomputation settings an out-of-memory run has not used yet, least costly first."""
    if args.gradient_checkpointing:
        return " (--gradient_checkpointing true is on already: the least memory per token)"
    selective = ("--selective_checkpointing true (recompute norms and rotary too: less memory again, some 10-20% slower) or "
                 if args.selective_checkpointing != "true" else "")
    return ", or pass " + selective + "--gradient_checkpointing true (least memory)"


def memory_preflight(trainer, pairs) -> None:
    """Run forward + backward on the worst-case batch; raise a PreftuneError on out-of-memory.

    Leaves parameters, gradients, optimizer state and RNG streams as they were.
    """
    args = trainer.args
    batch_pairs = largest_batch(pairs, args.per_device_train_batch_size, args.max_tokens_per_batch)
    if not batch_pairs:
        return
    from .layout import batch_to

    batch = batch_to(trainer.data_collator(batch_pairs), trainer.args.device)
    model = trainer.model
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        model.train()
        seq = trainer.sequence_logps(model, batch)  # the engine as a training step runs it
        (seq.chosen_sum.sum() + seq.rejected_sum.sum()).backward()
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        tokens = sum(p.packed_length for p in batch_pairs)
        raise PreftuneError(
            f"out of memory on the largest batch of this run ({len(batch_pairs)} pairs, {tokens} tokens, "
            f"longest pair {batch_pairs[0].packed_length} tokens) before training started. Fixes: set --max_tokens_per_batch "
            f"(e.g. {max(tokens // 2, 1)}), lower --max_length / --per_device_train_batch_size (raise --gradient_accumulation_steps "
            f"to keep the batch){_recompute_advice(args)}"
        ) from None
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
