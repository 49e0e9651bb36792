"""``PreferenceTrainer``: a thin ``transformers.Trainer`` subclass.

It turns a collated batch into per-sequence log-probs (:mod:`preftune.engine`), asks
:mod:`preftune.objective` for the loss, and keeps running metric sums for logging. No
tokenization, no layout logic and no loss maths live here.

Overridden public Trainer methods: ``compute_loss``, ``prediction_step``, ``log``, ``save_model``
(a ReFT model writes only its interventions), ``train`` (memory preflight; restoring a method's
running state and a TR-DPO reference on resume),
``get_batch_samples`` (to know the totals of each gradient-accumulation window, and the window-wide
values some losses need) and ``get_train_dataloader`` (only for ``max_tokens_per_batch``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer

from .data.store import as_tokenized_pairs
from .engine import sequence_logps
from .errors import PreftuneError
from .hf_helpers import pad_token_id as pad_id_of, unwrap_model
from .model_hooks import NO_HOOKS, ModelHooks
from .reft import reft_hooks
from .layout import PairTokens, PreferenceCollator, attention_cost_for, batch_to
from .methods import Hyperparameters, get_method
from .objective import Window, compute_objective, window_values
from .window import MethodStateCallback, gather_window_values, read_method_state

logger = logging.getLogger(__name__)

__all__ = ["PairDataset", "PreferenceTrainer", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


class PairDataset(Dataset):
    """Tokenized pairs (:class:`preftune.data.store.TokenizedPairs`, or a list of
    :class:`PairTokens`, copied into one) as a torch Dataset; items are built on demand."""

    def __init__(self, pairs):
        self.pairs = as_tokenized_pairs(pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i) -> PairTokens:
        return self.pairs[i]

    def lengths(self) -> np.ndarray:
        """Packed length of every pair, ``(N,)`` (no pair is built)."""
        return self.pairs.lengths()


class _MetricBank:
    """Running (sum, count) of every metric between two log calls (one bank for train, one for eval).

    ``loss_sum`` is the sum over micro-batches of (micro-batch loss x its pairs), for the eval
    loss: in evaluation each batch is its own window, so its loss is the objective's own value.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = defaultdict(float)
        self.counts = defaultdict(float)
        self.pairs = 0.0
        self.nll_sum = 0.0
        self.nll_tokens = 0.0
        self.loss_sum = 0.0
        self.tokens = 0.0

    def add(self, result, tokens: float):
        for k, (total, count) in result.metric_sums.items():
            self.sums[k] += total
            self.counts[k] += count
        self.pairs += result.pairs
        self.nll_sum += result.nll_sum
        self.nll_tokens += result.nll_tokens
        self.loss_sum += result.loss.detach().item() * result.pairs
        self.tokens += tokens

    def as_tensor(self, keys: list[str], device) -> torch.Tensor:
        vals = [self.sums.get(k, 0.0) for k in keys] + [self.counts.get(k, 0.0) for k in keys]
        vals += [self.pairs, self.nll_sum, self.nll_tokens, self.loss_sum, self.tokens]
        return torch.tensor(vals, dtype=torch.float64, device=device)


class PreferenceTrainer(Trainer):
    """Trainer for every preference method; ``args`` is a :class:`preftune.config.PreftuneConfig`.

    Args:
        model: a transformers causal LM (optionally PEFT-wrapped).
        args: the run configuration.
        train_pairs / eval_pairs: tokenized pairs: :class:`preftune.data.store.TokenizedPairs` (see
            :func:`preftune.data.splits.prepare_data`) or a list of :class:`PairTokens`.
        processing_class: the tokenizer (saved with the model).
        reference: callable ``(model, batch) -> (chosen_sum, rejected_sum)`` for methods that need
            one (:func:`preftune.reference.build_reference`), else None.
        pad_token_id: the id batches are padded with (default: from ``processing_class``).
        hooks: what the model needs done around it (:class:`preftune.model_hooks.ModelHooks`:
            ReFT's batch context and interventions-only saving); default: derived from ``model``
            from the ReFT interventions it carries, if any (:func:`preftune.reft.reft_hooks`).
    """

    def __init__(self, model, args, train_pairs=None, eval_pairs=None, processing_class=None, reference=None, pad_token_id=None,
                 hooks: ModelHooks | None = None, **kwargs):
        if pad_token_id is None:
            pad_token_id = pad_id_of(processing_class)
        collator = PreferenceCollator(
            pad_id=pad_token_id,
            layout=args.batch_layout,
            score_prompt=args.nll_on_prompt,
            row_budget=args.row_budget,
            attention_cost=attention_cost_for(getattr(unwrap_model(model), "config", None)),
            tail_weight=args.ld_alpha,
        )
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        # ours first, so their on_save runs before a checkpoint is marked complete
        own_callbacks = [MethodStateCallback()]
        self._ref_sync = None
        if args.sync_ref_model:
            from .ref_sync import RefModelSyncCallback

            ref_model = getattr(reference, "model", None)
            if ref_model is None or getattr(reference, "adapters_off", False):
                raise PreftuneError("--sync_ref_model needs a separate reference model to update; with --use_peft the reference is the base model "
                                    "with adapters disabled (train without --use_peft, or drop --sync_ref_model)")
            self._ref_sync = RefModelSyncCallback(ref_model, args.ref_model_mixup_alpha, args.ref_model_sync_steps)
            own_callbacks.append(self._ref_sync)
        from .reliability import CheckpointMarkerCallback

        # every checkpoint gets its manifest marker, after every other on_save has written its
        # files; old checkpoints are rotated only after it (see train)
        marker = CheckpointMarkerCallback(keep_last=args.save_total_limit)
        callbacks = [*own_callbacks, *(kwargs.pop("callbacks", None) or []), marker]
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=PairDataset(train_pairs) if train_pairs is not None else None,
            eval_dataset=PairDataset(eval_pairs) if eval_pairs is not None and len(eval_pairs) else None,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        self.reference = reference
        self.method = get_method(args.method)
        self.hyperparameters = Hyperparameters.from_config(args)
        if self.method.data_warnings is not None and train_pairs:
            for message in self.method.data_warnings(train_pairs, self.hyperparameters):
                logger.warning("%s", message)
        # whether this loss needs window-wide values (see preftune.objective)
        self._uses_window = self.method.needs_window(self.hyperparameters)
        self.hooks = hooks if hooks is not None else (reft_hooks(model) or NO_HOOKS)
        # compute_loss already returns this micro-batch's share of the window loss
        self.loss_is_scaled_for_ga = True
        self._window: Window | None = None
        self._window_starts: list[int] = []
        self._micro_index = 0
        self._prepass_refs: list = []
        self._banks = {"train": _MetricBank(), "eval": _MetricBank()}
        self._last_log_time = time.perf_counter()
        self._nonfinite_steps = 0
        self.aux_coef = self._resolve_aux_coef(model, args)

    @staticmethod
    def _resolve_aux_coef(model, args) -> float:
        config = getattr(model, "config", None)
        if not getattr(config, "output_router_logits", False):
            return 0.0
        if args.router_aux_loss_coef is not None:
            return float(args.router_aux_loss_coef)
        return float(getattr(config, "router_aux_loss_coef", 0.001))

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train`` preceded by the allocator setting (:mod:`preftune.allocator`),
        selective activation checkpointing (:mod:`preftune.checkpointing`), the CPU linear
        kernel (:mod:`preftune.linear_kernel`: oneDNN on the policy and a separate reference model in
        float32; under mixed precision frozen weights cast once, and those bf16 holds exactly held
        in bf16, the reference's too) and
        the memory preflight (:mod:`preftune.reliability`).

        ``resume_from_checkpoint=True`` resumes from the newest checkpoint that verifies against
        its manifest (:func:`preftune.rundir.resolve_resume`), not merely the newest folder. A resumed run first
        restores the method's running state and a TR-DPO reference.
        ``save_total_limit`` is applied by :class:`preftune.reliability.CheckpointMarkerCallback`
        after each new checkpoint is marked complete: transformers' own rotation runs inside
        ``_save_checkpoint`` before ``on_save``, and with ``save_total_limit=1`` would delete the
        last good checkpoint before the new one is on disk and verified. It is switched off for
        the duration of training and restored afterwards.
        """
        if self.args.reuse_freed_memory:
            from .allocator import reuse_freed_memory

            reuse_freed_memory()
        if not self.args.gradient_checkpointing:
            from .checkpointing import enable_feed_forward_checkpointing, enable_selective_checkpointing

            if self.args.selective_checkpointing == "true":
                enable_selective_checkpointing(self.model)
            elif self.args.selective_checkpointing == "mlp":
                enable_feed_forward_checkpointing(self.model)
        from .linear_kernel import enable_linear_kernel, linear_kernel_of, release_cast_copies

        kernel = linear_kernel_of(self.args)
        enable_linear_kernel(self.model, kernel)
        ref_model = getattr(self.reference, "model", None)
        separate_ref = ref_model if ref_model is not None and ref_model is not self.model else None
        if separate_ref is not None and (kernel == "onednn" or self._ref_sync is None):
            # cast_once: no copies (they would add half its float32 size), exact weights stored in bf16;
            # not under TR-DPO, whose sync writes policy mixtures into the reference's weights
            enable_linear_kernel(separate_ref, kernel, keep_copies=False)
        if resume_from_checkpoint is True:
            from .rundir import resolve_resume

            resume_from_checkpoint = resolve_resume("latest", self.args.output_dir)
        if self.args.memory_preflight and self.train_dataset is not None and len(self.train_dataset):
            from .reliability import memory_preflight

            memory_preflight(self, self.train_dataset.pairs)
        if resume_from_checkpoint:
            from .rundir import SYNCED_REF_MODEL_FILE, TRAINER_STATE_FILE, read_json

            saved = read_json(Path(resume_from_checkpoint) / TRAINER_STATE_FILE) or {}
            self._method_state().values = read_method_state(saved) or {}
            if self._ref_sync is not None and not self._ref_sync.load(resume_from_checkpoint) and saved.get("global_step", 0) >= self.args.ref_model_sync_steps:
                raise PreftuneError(f"{resume_from_checkpoint} has no {SYNCED_REF_MODEL_FILE}: the TR-DPO reference it trained against is lost; "
                                    "resume from a checkpoint written with --sync_ref_model, or start again")
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.args.save_total_limit = limit
            for model in (self.model, separate_ref):
                if model is not None:
                    release_cast_copies(model)

    def _method_state(self) -> MethodStateCallback:
        """The running-state callback (looked up: transformers may replace it when restoring callbacks)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, MethodStateCallback))

    # --- data ------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.args.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        from .sampling import EpochDataLoader, TokenBudgetBatchSampler

        sampler = TokenBudgetBatchSampler(
            self.train_dataset.lengths(),
            max_tokens=self.args.max_tokens_per_batch,
            seed=self.args.seed,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )
        return EpochDataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals = torch.tensor(
            [sum(float(b["num_pairs"]) for b in batch_samples), sum(float(b["num_nll_tokens"]) for b in batch_samples)],
            dtype=torch.float64,
            device=device,
        )
        n_proc = self.accelerator.num_processes
        if n_proc > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        # DDP averages gradients over processes, so each process's share is scaled up by n_proc
        self._window = Window(pairs=float(totals[0]) / n_proc, nll_tokens=max(float(totals[1]) / n_proc, 1.0))
        self._micro_index = 0
        self._prepass_refs = []
        if self._uses_window and len(batch_samples) > 1:
            self._window_prepass(batch_samples)
        return batch_samples, num_items

    # --- loss --------------------------------------------------------------------------------
    def sequence_logps(self, model, inputs):
        """The engine on one batch with this run's settings, under its mixed precision.

        accelerate applies autocast by wrapping ``model.forward``, which the engine does not call
        (it runs the decoder and the LM head itself), so the autocast context is entered here.
        """
        with self.accelerator.autocast():
            return sequence_logps(model, inputs, chunk_size=self.args.logprob_chunk_size, cache_mb=self.args.logprob_cache_mb,
                                  batch_context=self.hooks.batch_context, with_aligned=self.hyperparameters.use_weighting)

    def _forward(self, model, inputs, ref=None):
        """Policy statistics and (unless given) the reference's log-probs of one batch."""
        seq = self.sequence_logps(model, inputs)
        if ref is None and self.reference is not None:
            with self.accelerator.autocast():
                ref = self.reference(model, inputs)
        return seq, ref

    def _window_prepass(self, batch_samples) -> None:
        """Window-wide values of a multi-micro-batch window: one forward-only pass over it first."""
        model = self.model_wrapped
        local = []
        was_training = model.training
        model.train()  # the same mode, and so the same numbers, as the training forward
        with torch.no_grad(), torch.random.fork_rng(devices=[self.args.device] if self.args.device.type == "cuda" else []):
            for batch in batch_samples:
                inputs = batch_to(batch, self.args.device)
                seq, ref = self._forward(model, inputs)
                self._prepass_refs.append(ref)
                local.append(window_values(self.method, self.hyperparameters, seq, ref, inputs.get("desirable")))
        model.train(was_training)
        self._finish_window(local)

    def _finish_window(self, local: list[dict]) -> None:
        """Gather the window's values over processes and advance the method's running state."""
        values, self._window_starts = gather_window_values(local, self.accelerator, self.args.device)
        state = self._method_state()
        if self.method.advance_state is not None:
            state.values = self.method.advance_state(state.values, values, self.hyperparameters)
        self._window = dataclasses.replace(self._window, values=values, state=dict(state.values))

    def _objective(self, model, inputs, mode: str):
        training = mode == "train" and self._window is not None
        # the window pre-pass already ran the reference on this micro-batch
        cached = self._prepass_refs[self._micro_index] if training and self._micro_index < len(self._prepass_refs) else None
        seq, ref = self._forward(model, inputs, cached)
        desirable = inputs.get("desirable")
        b = int(inputs["num_pairs"])
        if not training:  # the batch is its own window
            window = Window(pairs=float(b), nll_tokens=max(float(inputs["num_nll_tokens"]), 1.0), state=dict(self._method_state().values))
        else:
            if self._uses_window and self._window.values is None:  # one micro-batch per process: values from this forward
                self._finish_window([window_values(self.method, self.hyperparameters, seq, ref, desirable)])
            window = self._window
            if self._uses_window:
                start = self._window_starts[self._micro_index]
                window = dataclasses.replace(window, index=torch.arange(start, start + b, device=seq.chosen_sum.device))
            self._micro_index += 1
        return compute_objective(self.method, self.hyperparameters, seq, window, ref=ref, aux_coef=self.aux_coef, desirable=desirable)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        result = self._objective(model, inputs, mode)
        loss = result.loss
        if mode == "train" and not torch.isfinite(loss):
            loss = self._skip_nonfinite(loss, inputs)
        else:
            self._banks[mode].add(result, float(inputs["num_tokens"]))
        return (loss, result) if return_outputs else loss

    def _skip_nonfinite(self, loss, inputs):
        self._nonfinite_steps += 1
        ids = inputs["example_ids"].tolist()
        logger.warning("non-finite loss (%s) at step %d; skipping this micro-batch (example ids %s)", loss.item(), self.state.global_step, ids)
        if self._nonfinite_steps > self.args.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._nonfinite_steps} micro-batches had a non-finite loss (last at step {self.state.global_step}, example ids {ids}); "
                "lower --learning_rate, check those examples, or raise --max_nonfinite_steps"
            )
        # zero loss that still touches every trainable parameter (keeps DDP's reducer in step)
        return sum((p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad), torch.zeros((), device=loss.device))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- saving ------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model; a model that saves only its own small parts (ReFT) does so here.

        Checkpoints (``_internal_call``) keep the full Trainer format so resuming works.
        """
        save_own = self.hooks.save_pretrained
        if save_own is None or _internal_call:
            return super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            save_own(output_dir or self.args.output_dir)

    # --- logging -------------------------------------------------------------------------------
    def _drain(self, mode: str) -> dict[str, float]:
        bank = self._banks[mode]
        keys = sorted(bank.sums)
        values = bank.as_tensor(keys, self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        values = values.tolist()
        n = len(keys)
        sums, counts = values[:n], values[n : 2 * n]
        pairs, nll_sum, nll_tokens, loss_sum, tokens = values[2 * n :]
        bank.reset()
        if pairs == 0:
            return {}
        out = {k: total / count for k, total, count in zip(keys, sums, counts) if count > 0}
        if self.method.derived_metrics is not None:
            out.update(self.method.derived_metrics(out))
        if "nll_loss" in self.method.metrics:
            out["nll_loss"] = nll_sum / max(nll_tokens, 1.0)
        out["_loss"] = loss_sum / pairs
        out["_tokens"] = tokens
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_eval = any(k.startswith("eval_") for k in logs)
        if is_eval:
            metrics = self._drain("eval")
            if metrics:
                logs["eval_loss"] = metrics.pop("_loss")
                metrics.pop("_tokens")
                logs.update({f"eval_{k}": v for k, v in metrics.items()})
        elif "loss" in logs:
            metrics = self._drain("train")
            if metrics:
                metrics.pop("_loss")
                now = time.perf_counter()
                tokens = metrics.pop("_tokens")
                logs["tokens_per_second"] = tokens / max(now - self._last_log_time, 1e-9)
                self._last_log_time = now
                logs.update(metrics)
        super().log(logs, start_time)

