"""Selective activation checkpointing: keep what is expensive to recompute, recompute the rest.

What a decoder layer keeps for its backward is dominated by the elementwise work between the
matmuls, not by the matmuls' own outputs. In a SwiGLU MLP ``down(silu(gate(x)) * up(x))`` under
LoRA, autograd keeps four ``(T, intermediate)`` tensors per layer: ``gate(x)`` (for SiLU's
backward), ``silu(gate(x))`` and ``up(x)`` (for the product's), and the product itself (the input
of ``down``'s LoRA ``A``). Measured on a Qwen2-0.5B-shaped model with LoRA: 1.09 of the 1.52 GB
kept for the backward at 609 tokens per step.

``--selective_checkpointing`` has three settings:

* ``mlp`` (the default, :func:`enable_feed_forward_checkpointing`): only each layer's
  feed-forward block keeps less. A gated MLP keeps ``gate(x)`` and ``up(x)`` and recomputes the
  activation and the product in the backward (:class:`_GatedProduct`, and a saved-tensor hook
  that packs ``down``'s saved input into a recipe); other blocks run under the selective policy
  below. No matmul is recomputed (but LoRA's rank-``r`` ``B`` in the generic case). Measured on
  the Qwen2-0.5B shape with LoRA: the MLP keeps 545 instead of 1,087 MB at 609 tokens, and the
  step spends about 0.08 s more in elementwise work (of 8-10 s).
* ``true`` (:func:`enable_selective_checkpointing`): every decoder layer runs under PyTorch's
  selective activation checkpointing (``create_selective_checkpoint_contexts``, through
  transformers' own per-layer checkpointing) with a policy per operation:

  * **kept** (``MUST_SAVE``): the output of every matmul whose contraction is at least
    :data:`MIN_SAVED_CONTRACTION` (64) long: the projections, at ``2 x K`` FLOPs per output
    element, the work worth keeping; attention kernels' outputs;
  * **recomputed** in the backward (``PREFER_RECOMPUTE``): everything else: norms, rotary
    embeddings, activations, products, residual adds, LoRA's rank-``r`` ``B`` matmul (``2 r``
    FLOPs per element), copies and views; dropout too (the checkpoint restores the random state
    before the replay, so the masks come out the same; preftune turns dropout off by default).

  The attention block then keeps ``q``/``k``/``v``/``o`` projections and the attention output
  instead of normed, rotated and reshaped copies, at the price of replaying each layer (10-20% of
  step time).
* ``false``: autograd keeps what it keeps.

Values and gradients are unchanged in every setting (the recomputations run the same operations
on the same inputs; ``tests/test_checkpointing.py`` checks bit equality against the plain path
on every fast-path model family). Full checkpointing (``--gradient_checkpointing true``, every
layer's whole forward replayed) replaces all of this; model classes without transformers'
checkpointing support run ``true`` as ``false``.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .hf_helpers import is_forward_wrapped, unwrap_forward, unwrap_model, wrap_forward

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_SAVED_CONTRACTION", "FEED_FORWARD_NAMES", "selective_policy", "selective_checkpoint_contexts", "enable_selective_checkpointing",
    "enable_feed_forward_checkpointing", "disable_feed_forward_checkpointing",
]

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
if hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # preftune.linear_kernel's oneDNN linear: x is first
    _MATMULS[torch.ops.mkldnn._linear_pointwise.default] = 0


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



FEED_FORWARD_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
"""Attribute names under which a decoder layer holds its feed-forward block (dense MLP or mixture
of experts), in transformers' model families."""


def _feed_forward_blocks(model):
    """The feed-forward block of every decoder layer (transformers' ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = unwrap_model(model)
    for layer in inner.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for name in FEED_FORWARD_NAMES:
                block = getattr(layer, name, None)
                if isinstance(block, torch.nn.Module):
                    yield block
                    break


class _AutocastState:
    """The autocast setting of the forward, re-entered for a recomputation in the backward (the
    autograd engine runs backward functions outside the caller's autocast)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _GatedRecompute:
    """What the backward of one gated product needs: ``g``, ``u``, the activation, the forward's
    autocast setting, and ``act(g)`` once recomputed (with its graph back to a detached ``g``), so
    ``down``'s saved input and :class:`_GatedProduct`'s backward share one recomputation."""

    __slots__ = ("g", "u", "act", "autocast_state", "g_leaf", "s")

    def __init__(self, g, u, act, autocast_state):
        self.g, self.u, self.act, self.autocast_state = g, u, act, autocast_state
        self.g_leaf = self.s = None

    def act_of_g(self):
        """``(g_leaf, act(g_leaf))``, computed on first use."""
        if self.s is None:
            with torch.enable_grad(), self.autocast_state():
                self.g_leaf = self.g.detach().requires_grad_()
                self.s = self.act(self.g_leaf)
        return self.g_leaf, self.s

    def product(self) -> torch.Tensor:
        """``act(g) * u`` as the forward computed it."""
        _, s = self.act_of_g()
        with torch.no_grad(), self.autocast_state():
            return s.detach() * self.u

    def release(self) -> None:
        self.g_leaf = self.s = None


class _GatedProduct(torch.autograd.Function):
    """``h = act(g) * u`` keeping only ``g`` and ``u`` for the backward.

    Plain autograd keeps ``g`` (for the activation's backward), ``act(g)`` and ``u`` (for the
    product's). The backward recomputes ``s = act(g)`` (or takes the one ``down``'s unpacked input
    already recomputed) and runs the product's and the activation's own backward: ``grad_u =
    grad_h * s``, ``grad_g = act'(g) grad_h * u`` through autograd, the same operations on the same
    values as the plain path, so the gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx, g, u, recompute: _GatedRecompute):
        ctx.recompute = recompute
        ctx.save_for_backward(g, u)  # (the version check: neither may change before the backward)
        return recompute.act(g) * u

    @staticmethod
    def backward(ctx, grad_h):
        _, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[:2]
        g_leaf, s = ctx.recompute.act_of_g()
        grad_u = grad_h * s.detach() if need_u else None
        grad_g = torch.autograd.grad(s, g_leaf, grad_h * u)[0] if need_g else None
        ctx.recompute.release()
        return grad_g, grad_u, None


class _RecomputedProduct:
    """What a saved view of ``h = act(g) * u`` is packed into: the product's
    :class:`_GatedRecompute` and the view's geometry."""

    __slots__ = ("recompute", "size", "stride", "offset")

    def __init__(self, recompute: _GatedRecompute, view: torch.Tensor):
        self.recompute = recompute
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def unpack(self) -> torch.Tensor:
        return self.recompute.product().as_strided(self.size, self.stride, self.offset)


def _gated_mlp_forward(self, x):
    """``down(act(gate(x)) * up(x))`` keeping two ``(T, intermediate)`` tensors instead of four.

    ``act(g)`` is never kept (:class:`_GatedProduct`) and the product ``h``, which ``down`` keeps
    for its weight (or LoRA ``A``) gradient, is packed by a saved-tensor hook into a reference to
    ``g`` and ``u`` and recomputed when ``down``'s backward asks for it. No matmul is recomputed;
    the backward adds one activation and one product per layer to the plain path's work.
    """
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)
    g, u = self.gate_proj(x), self.up_proj(x)
    recompute = _GatedRecompute(g, u, self.act_fn, _AutocastState(x.device.type))
    h = _GatedProduct.apply(g, u, recompute)
    # the hooks live as long as the saved tensors: they must not hold ``h`` itself
    storage, dtype = h.untyped_storage().data_ptr(), h.dtype

    def pack(t):
        if t.untyped_storage().data_ptr() == storage and t.dtype == dtype:
            return _RecomputedProduct(recompute, t)
        return t

    def unpack(packed):
        return packed.unpack() if isinstance(packed, _RecomputedProduct) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(h)


def _selectively_checkpointed_forward(self, *args, **kwargs):
    """The block's own forward under :func:`selective_checkpoint_contexts` while training with
    gradients; unchanged otherwise (evaluation, generation, ``torch.no_grad``)."""
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, context_fn=selective_checkpoint_contexts, **kwargs)


_WRAPPERS = (_gated_mlp_forward, _selectively_checkpointed_forward)


def _is_gated_mlp(block) -> bool:
    """Whether ``block`` computes exactly ``down(act(gate(x)) * up(x))`` with its own submodules:
    the attributes are there and, on a 3-token probe in the block's training mode (the same seed
    for both calls, the caller's random state untouched), the class's forward and
    :func:`_gated_mlp_forward` return the same bits. A block that adds anything (dropout, a bias,
    a different order) fails the probe and is checkpointed generically instead."""
    parts = [getattr(block, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if any(p is None for p in parts) or not all(isinstance(p, torch.nn.Module) for p in parts[:3]):
        return False
    hidden = getattr(block.gate_proj, "in_features", None)
    weight = next((p for p in block.parameters() if p.is_floating_point()), None)
    if not hidden or weight is None:
        return False
    was_training = block.training
    block.train()
    try:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []), torch.enable_grad():
            probe = torch.randn(1, 3, hidden, dtype=weight.dtype, device=weight.device)
            torch.manual_seed(0)
            expected = type(block).forward(block, probe)
            torch.manual_seed(0)
            got = _gated_mlp_forward(block, probe)
    except Exception:  # noqa: BLE001 - any failure means "not this shape"
        return False
    finally:
        block.train(was_training)
    return isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor) and torch.equal(expected, got)


def enable_feed_forward_checkpointing(model) -> int:
    """Keep less of every decoder layer's feed-forward block for the backward; recompute its
    elementwise work instead. Values and gradients are unchanged.

    * A gated MLP ``down(act(gate(x)) * up(x))`` (Llama, Qwen, Mistral, Gemma, ... checked on a
      probe by :func:`_is_gated_mlp`) runs :func:`_gated_mlp_forward`: it keeps ``gate(x)`` and
      ``up(x)`` and recomputes ``act`` and the product (one elementwise pass each) in the
      backward, where plain autograd keeps four ``(T, intermediate)`` tensors. With LoRA on a
      Qwen2-0.5B shape that is about a third of all activation memory.
    * Any other block (GPT-2's MLP, fused ``gate_up_proj``, mixtures of experts) runs under
      :func:`selective_checkpoint_contexts`: projection outputs kept, the rest recomputed.

    The attention block is left alone: replaying it (its segment loop, rotary, norms) costs more
    than the little it would save. Sets the block's ``forward`` on the instance (bound with
    ``types.MethodType``, so a deep copy rebinds to the copy); a block whose ``forward`` someone
    else already replaced on the instance (accelerate's offloading hooks) is left alone. Returns
    how many blocks run a wrapped forward.
    """
    wrapped = 0
    for block in _feed_forward_blocks(model):
        if "forward" in vars(block):
            if is_forward_wrapped(block, _WRAPPERS):
                wrapped += 1
            else:
                logger.info("feed-forward checkpointing: %s already has its own forward; left alone", type(block).__name__)
            continue
        wrapped += wrap_forward(block, _gated_mlp_forward if _is_gated_mlp(block) else _selectively_checkpointed_forward)
    return wrapped


def disable_feed_forward_checkpointing(model) -> None:
    """Undo :func:`enable_feed_forward_checkpointing`."""
    for block in _feed_forward_blocks(model):
        unwrap_forward(block, _WRAPPERS)
