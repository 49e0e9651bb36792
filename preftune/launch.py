"""How a run was launched, and what its processes do together.

A run is one process (``preftune train``) or several that a launcher started (``torchrun
--nproc_per_node N -m preftune train``, on one node or on several). What depends on that lives here:

* :class:`Launch`: the world size (the processes that train together:
  ``TrainingArguments.world_size``, which accelerate's ``PartialState`` reads from the launcher's
  ``WORLD_SIZE``) and the number of nodes (torchrun's ``GROUP_WORLD_SIZE``, the number of node
  agents; else ``WORLD_SIZE / LOCAL_WORLD_SIZE``); :meth:`Launch.resume_command` is the command
  that starts the same launch again. Resuming a 2-process run with one process would not continue
  it: the global batch (``per_device_train_batch_size x gradient_accumulation_steps x world
  size``) halves, and the data position (steps x batches) no longer points where it stopped.
* :func:`check_resume_launch`: a resume whose world size differs from the one its checkpoint was
  written with (recorded in the checkpoint's ``.complete`` marker:
  :func:`preftune.rundir.checkpoint_origin`) is refused before anything is written, unless
  ``--allow_world_size_change true``; then one warning says how the global batch changed.
* :func:`agree_on_signal`: at the end of every optimizer step the processes learn whether any of
  them received SIGINT/SIGTERM, so all of them stop after the same step. (A signal reaches the
  processes at slightly different moments; a process that stopped alone would save while the
  others waited for it in the next step's gradient all-reduce.)
* :func:`say_once`: a message every process holds (an interrupt, a refused resume) is printed by
  process 0; the others wait until it has, and print it themselves only if process 0 is gone. When
  the first process exits, torchrun stops the others with SIGTERM: without the wait, process 0
  (still writing the checkpoint marker, or about to print) was the one that died.
* :func:`end_processes`: the process group is destroyed before the interpreter exits. Without it
  gloo's threads can abort the exit ("terminate called without an active exception"), which
  torchrun reports as a failed process although the run succeeded.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import EveryProcessError

logger = logging.getLogger(__name__)

__all__ = ["Launch", "current_launch", "resume_options", "describe_global_batch", "check_resume_launch", "is_multi_process",
           "agree_on_signal", "say_once", "end_processes"]


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Launch:
    """How many processes train together, on how many nodes."""

    world_size: int
    nodes: int = 1
    launcher: str = "torchrun"  # or "accelerate" (``accelerate launch``, which may carry an FSDP/DeepSpeed config)

    @property
    def per_node(self) -> int:
        return max(1, self.world_size // max(1, self.nodes))

    def describe(self) -> str:
        """``1 process``, ``2 processes``, ``8 processes on 2 nodes``."""
        text = f"{self.world_size} process" + ("" if self.world_size == 1 else "es")
        return text + (f" on {self.nodes} nodes" if self.nodes > 1 else "")

    def resume_command(self, options: str) -> str:
        """The command that starts this launch again with ``options`` (e.g. ``--output_dir OUT
        --resume_from_checkpoint latest``): ``preftune train``, the torchrun form for several
        processes on one node, and for several nodes what every node runs."""
        if self.world_size <= 1:
            return f"preftune train {options}"
        if self.launcher == "accelerate":
            return (f"your accelerate launch command ({self.describe()}, e.g. accelerate launch --config_file CONFIG "
                    f"-m preftune train) with {options}")
        if self.nodes <= 1:
            return f"torchrun --nproc_per_node {self.world_size} -m preftune train {options}"
        return (f"on each of the {self.nodes} nodes, its usual launch command ({self.per_node} processes per node, e.g. "
                f"torchrun --nnodes {self.nodes} --nproc_per_node {self.per_node} ... -m preftune train) with {options}")


def current_launch(world_size: int) -> Launch:
    """This run's launch; ``world_size``: ``TrainingArguments.world_size``. ``accelerate launch``
    is told from torchrun by a variable only it sets (``ACCELERATE_DYNAMO_BACKEND``)."""
    nodes = _env_int("GROUP_WORLD_SIZE")  # torchrun: one agent per node
    if nodes is None:
        local = _env_int("LOCAL_WORLD_SIZE")
        nodes = world_size // local if local else 1
    launcher = "accelerate" if "ACCELERATE_DYNAMO_BACKEND" in os.environ else "torchrun"
    return Launch(world_size, max(1, min(nodes, world_size)), launcher)


def resume_options(output_dir: str | Path | None, resume: str = "latest") -> str:
    """The flags that resume a run folder that recorded its command (``output_dir=None``: one that
    did not, whose options must be given again: ``...``)."""
    where = f"--output_dir {shlex.quote(str(output_dir))}" if output_dir is not None else "..."
    return f"{where} --resume_from_checkpoint {shlex.quote(str(resume))}"


def describe_global_batch(per_device: int | None, accumulation: int | None, world_size: int, tokens: int | None = None) -> str:
    """``8 (4 x 1 x 2)``: pairs (or, with ``tokens``, the token budget) per optimizer step over all processes."""
    unit = per_device if tokens is None else tokens
    if unit is None or accumulation is None:
        return f"? x ? x {world_size}"
    suffix = " tokens" if tokens is not None else ""
    return f"{unit * accumulation * world_size}{suffix} ({unit} x {accumulation} x {world_size})"


def check_resume_launch(checkpoint: str | Path, args, resume_flags: str) -> None:
    """Refuse (every process alike) to resume ``checkpoint`` with another world size than it was
    written with, unless ``args.allow_world_size_change``; then warn once. ``resume_flags``: what
    resumes the run (:func:`resume_options`), for the command the message gives. A checkpoint that
    does not say how it was written (:func:`preftune.rundir.checkpoint_origin` is None) passes."""
    from .rundir import checkpoint_origin

    origin = checkpoint_origin(Path(checkpoint))
    now = current_launch(args.world_size)
    if origin is None or origin.world_size == now.world_size:
        return
    then = Launch(origin.world_size, origin.nodes, origin.launcher)
    before = describe_global_batch(origin.per_device_train_batch_size, origin.gradient_accumulation_steps, then.world_size,
                                   origin.max_tokens_per_batch)
    after = describe_global_batch(args.per_device_train_batch_size, args.gradient_accumulation_steps, now.world_size, args.max_tokens_per_batch)
    name = Path(checkpoint).name
    if not args.allow_world_size_change:
        raise EveryProcessError(
            f"--resume_from_checkpoint: {name} was written by {then.describe()} and this run has {now.describe()}; the global batch "
            f"(per_device_train_batch_size x gradient_accumulation_steps x world size) would change from {before} to {after} and the "
            f"data position would no longer match; resume with the original {then.describe()}: `{then.resume_command(resume_flags)}`, "
            f"or pass --allow_world_size_change true to continue with {now.describe()}"
        )
    if args.process_index == 0:
        logger.warning(
            "--allow_world_size_change: resuming %s, written by %s, with %s: the global batch (per_device_train_batch_size x "
            "gradient_accumulation_steps x world size) changes from %s to %s per optimizer step, and the step count goes on from "
            "the checkpoint's in the new batches (pairs of this epoch may be repeated or skipped)",
            name, then.describe(), now.describe(), before, after,
        )


# --- what the processes do together -----------------------------------------------------------------
def is_multi_process() -> bool:
    """Whether this process is one of several in an initialized process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_on_signal(received: int | None, device) -> int | None:
    """The signal any process received (the largest number if several), or None; every process
    of the group must call this at the same point (one all-reduce of one number)."""
    if not is_multi_process():
        return received
    import torch
    import torch.distributed as dist

    flag = torch.tensor([received or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def _meet(seconds: float = 120.0) -> None:
    """A barrier that fails (instead of hanging) when a process is gone."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timedelta(seconds=seconds))
    else:
        dist.barrier()


def say_once(text: str, file=None) -> None:
    """Print ``text``, which every process holds, once: process 0 prints it and then all meet, so
    no process exits (and gets process 0 stopped by the launcher) before it is out; if the
    meeting fails because process 0 is gone, the others print it. Ends the process group."""
    file = file or sys.stderr
    if not is_multi_process():
        print(text, file=file)
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        print(text, file=file, flush=True)
    try:
        _meet()
    except Exception:  # noqa: BLE001 - whatever the backend raises for a process that is gone
        if rank != 0:
            print(text, file=file, flush=True)
        return
    end_processes()


def end_processes() -> None:
    """Destroy the process group, if any (every process, when none is inside a collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
