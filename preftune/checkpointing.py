"""Selective activation checkpointing: keep what is expensive to recompute, recompute the rest.

What a decoder layer keeps for its backward is dominated by the elementwise work between the
matmuls, not by the matmuls' own outputs. In a SwiGLU MLP ``down(silu(gate(x)) * up(x))`` under
LoRA, autograd keeps four ``(T, intermediate)`` tensors per layer: ``gate(x)`` (for SiLU's
backward), ``silu(gate(x))`` and ``up(x)`` (for the product's), and the product itself (the input
of ``down``'s LoRA ``A``). Measured on a Qwen2-0.5B-shaped model with LoRA: 2.4 of the 3.1 GB
kept for the backward at 1,264 tokens per step.

Selective checkpointing (PyTorch's ``create_selective_checkpoint_contexts``, through
transformers' own per-layer checkpointing) runs each decoder layer under
``torch.utils.checkpoint`` with a policy per operation:

* **kept** (``MUST_SAVE``): the output of every matmul whose contraction is at least
  :data:`MIN_SAVED_CONTRACTION` (64) long: the projections, at ``2 x K`` FLOPs per output
  element, the work worth keeping; attention kernels' outputs;
* **recomputed** in the backward (``PREFER_RECOMPUTE``): everything else: norms, rotary
  embeddings, activations, products, residual adds, LoRA's rank-``r`` ``B`` matmul (``2 r``
  FLOPs per element), copies and views; dropout too (the checkpoint restores the random state
  before the replay, so the masks come out the same; preftune turns dropout off by default).

So the MLP keeps the two projection outputs ``gate``/``up`` (base and LoRA-A parts) and
recomputes SiLU and the product, about half of what it kept before; the attention block keeps
``q``/``k``/``v``/``o`` projections and the attention output instead of normed, rotated and
reshaped copies. The recomputation is elementwise work over one layer at a time. Values and
gradients are unchanged (the replay runs the same operations on the same inputs;
``tests/test_checkpointing.py`` checks bit equality against the plain path).

Full checkpointing (``--gradient_checkpointing true``, every layer's whole forward replayed)
replaces this; model classes without transformers' checkpointing support run without it.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .hf_helpers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["MIN_SAVED_CONTRACTION", "selective_policy", "selective_checkpoint_contexts", "enable_selective_checkpointing"]

MIN_SAVED_CONTRACTION = 64
"""Matmuls contracting over at least this many elements are kept; shorter ones (LoRA's rank-r
``B``) are recomputed."""

_aten = torch.ops.aten
# op -> index of the argument whose last dimension is the contraction
_MATMULS = {
    _aten.mm.default: 0,
    _aten.bmm.default: 0,
    _aten.addmm.default: 1,
    _aten.baddbmm.default: 1,
}


def _contraction(op, args) -> int | None:
    where = _MATMULS.get(op)
    if where is None or len(args) <= where or not isinstance(args[where], torch.Tensor):
        return None
    return int(args[where].shape[-1])


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul outputs with a long contraction and attention outputs; recompute the rest."""
    name = op.name() if hasattr(op, "name") else str(op)
    if "attention" in name or "flash_attn" in name:
        return CheckpointPolicy.MUST_SAVE
    k = _contraction(op, args)
    if k is not None and k >= MIN_SAVED_CONTRACTION:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: the :func:`selective_policy` contexts."""
    return create_selective_checkpoint_contexts(selective_policy)


def enable_selective_checkpointing(model) -> bool:
    """Checkpoint every decoder layer of ``model`` selectively (see the module docstring).

    Uses transformers' per-layer checkpointing (``activation_checkpointing_enable``) with a
    non-reentrant ``torch.utils.checkpoint`` and :func:`selective_checkpoint_contexts`; removes
    the input-embedding hook transformers adds for reentrant checkpointing (non-reentrant
    checkpointing needs no gradient on the embeddings, and under LoRA that hook would make the
    first layer compute an input gradient nobody uses). Returns False, doing nothing, for a
    model whose class has no checkpointing support.
    """
    inner = unwrap_model(model)
    if hasattr(inner, "get_base_model"):  # a PEFT wrapper: the transformers model inside
        inner = inner.get_base_model()
    if not getattr(inner, "supports_gradient_checkpointing", False) or not hasattr(inner, "activation_checkpointing_enable"):
        logger.info("selective activation checkpointing: %s does not support checkpointing; keeping every activation", type(inner).__name__)
        return False
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": selective_checkpoint_contexts})
    try:
        inner.disable_input_require_grads()
    except AttributeError:  # no hook was added (a model whose input is not token ids)
        pass
    return True

