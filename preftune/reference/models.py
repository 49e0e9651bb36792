"""On-the-fly DPO references: a forward-only pass of a frozen model (or of the PEFT base with
adapters disabled) for every batch. See :mod:`preftune.reference`."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..engine import sequence_logps
from ..hf_helpers import find_peft_model, unwrap_model
from ..model_hooks import NO_HOOKS
from ..reft import reft_hooks

__all__ = ["ReferenceFn", "ModelReference", "frozen", "model_device", "move_to"]

# (policy, batch) -> (chosen_sum, rejected_sum), each (B,) float32 on the batch's device
ReferenceFn = Callable[[nn.Module | None, dict], tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout) for the reference pass, then the caller's mode back."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _is_quantized_or_dispatched(model: nn.Module) -> bool:
    inner = unwrap_model(model)
    return bool(
        getattr(inner, "is_loaded_in_4bit", False)
        or getattr(inner, "is_loaded_in_8bit", False)
        or getattr(inner, "is_quantized", False)
        or getattr(inner, "hf_device_map", None)
    )


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_to(model: nn.Module, device: torch.device) -> None:
    """Put a reference model where the batches are (bitsandbytes / device_map models stay put)."""
    if model_device(model) != device and not _is_quantized_or_dispatched(model):
        model.to(device)


class ModelReference:
    """On-the-fly reference: a forward-only pass of a frozen model for every batch.

    Args:
        model: the frozen reference model, or (``adapters_off=True``) the ``PeftModel`` policy.
        chunk_size: tokens per LM-head chunk (``--logprob_chunk_size``).
        description: one line naming the reference, for the log.
        adapters_off: run ``model`` (or the PeftModel found inside the ``policy`` the trainer
            passes, e.g. under DDP) with its adapters disabled.
        follow_batch_device: move ``model`` to the batch's device on first use (a separate
            model built before the Trainer moved the policy).
    """

    def __init__(self, model: nn.Module, chunk_size: int, description: str, adapters_off: bool = False,
                 follow_batch_device: bool = True):
        self.model = model
        self.chunk_size = chunk_size
        self.description = description
        self.adapters_off = adapters_off
        self.follow_batch_device = follow_batch_device
        # a frozen copy of a ReFT policy carries its own interventions: their batch context
        self.batch_context = (reft_hooks(model) or NO_HOOKS).batch_context

    def __call__(self, policy: nn.Module | None, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.score(batch, policy)
        return seq.chosen_sum, seq.rejected_sum

    def score(self, batch: dict, policy: nn.Module | None = None):
        """The reference's :class:`preftune.engine.SequenceLogps` of ``batch`` (no gradients)."""
        model = self.model
        if self.adapters_off:
            model = find_peft_model(policy) or self.model
        elif self.follow_batch_device:
            move_to(model, batch["input_ids"].device)
        adapters = model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(model), adapters:
            return sequence_logps(model, batch, chunk_size=self.chunk_size, batch_context=self.batch_context)



def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model

