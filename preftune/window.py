"""Window-wide values and a method's running state (see :mod:`preftune.objective`).

Some losses need a detached value over the whole optimizer step: KTO's KL estimate, ``aot``'s
ranks, WPO's mean weight for an ``sft`` term, BCO's reward mean. Each micro-batch contributes
per-pair values ``name -> (B,)`` (``MethodSpec.window_values``); :func:`gather_window_values`
concatenates them over the micro-batches of the step and over processes, in a fixed order
(process 0's micro-batches first), and tells each local micro-batch where its pairs are.

:class:`MethodStateCallback` holds a method's running state (``MethodSpec.advance_state``, e.g.
BCO's reward shift). It is a ``transformers`` ``ExportableState``, so every checkpoint's
``trainer_state.json`` carries it; :func:`read_method_state` reads it back for an exact resume.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

__all__ = ["gather_window_values", "MethodStateCallback", "read_method_state"]


def gather_window_values(local: list[dict[str, torch.Tensor]], accelerator, device) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Concatenate per-micro-batch values over the window and all processes.

    Args:
        local: one ``name -> (B_m,)`` dict per micro-batch of this process, in training order.
        accelerator: the Trainer's ``accelerate.Accelerator`` (for the process count and gather).
        device: where the concatenated values go.

    Returns:
        ``(values, starts)``: ``name -> (N,)`` float64 over the window's ``N`` pairs, and the
        start of each local micro-batch's pairs in them.
    """
    names = sorted(local[0]) if local else []
    sizes = [int(next(iter(m.values())).shape[0]) if m else 0 for m in local]
    mine = {k: torch.cat([m[k].detach().double().cpu() for m in local]) for k in names}
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        everyone = gather_object([(sizes, {k: v.tolist() for k, v in mine.items()})])
        before = sum(sum(s) for s, _ in everyone[: accelerator.process_index])
        values = {k: torch.tensor([x for _, v in everyone for x in v[k]], dtype=torch.float64) for k in names}
    else:
        before, values = 0, mine
    starts, offset = [], before
    for size in sizes:
        starts.append(offset)
        offset += size
    return {k: v.to(device) for k, v in values.items()}, starts


class MethodStateCallback(TrainerCallback, ExportableState):
    """A method's running state ``name -> float``, saved in every checkpoint's trainer state."""

    def __init__(self, values: dict | None = None):
        self.values = dict(values or {})

    def state(self) -> dict:
        return {"args": {}, "attributes": {"values": dict(self.values)}}


def read_method_state(trainer_state: dict) -> dict | None:
    """The method state saved in a checkpoint's ``trainer_state.json`` (its parsed content); None if it holds none."""
    saved = (trainer_state.get("stateful_callbacks") or {}).get(MethodStateCallback.__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return dict((saved or {}).get("attributes", {}).get("values", {})) if saved else None
