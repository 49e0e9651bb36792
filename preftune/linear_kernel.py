"""Which matmul runs the float32 linear layers on a CPU: oneDNN's, or the BLAS behind ``F.linear``.

A linear layer computes ``y = x W^T + b`` with ``x`` ``(..., in)``, ``W`` ``(out, in)``. On a CPU,
``F.linear`` hands this to MKL's ``sgemm`` with a transposed ``B``. On this project's machine
(AMD EPYC, AVX-512, 2 cores; ``benchmarks/linear_kernels.py``) that layout ran well below the
machine's matmul rate at the shapes that dominate a LoRA step, and oneDNN's matmul (the primitive
behind ``torch.ops.mkldnn._linear_pointwise``, which PyTorch's own compiler uses for CPU linears)
did not:

* the projections of a 0.5B model at 609 tokens: ``(609, 896) x (896, 4864)`` 128-160 GFLOP/s
  through ``F.linear``, 190-204 through oneDNN;
* the LM head's ``(256, 896) x (896, 151936)`` chunk: 110-150 against 175-185.

The backward's input gradient ``dx = g W`` runs through oneDNN as well (as ``linear(g, W^T)``;
MKL was as fast at some shapes, slower at others: a decoder forward + backward with LoRA at
413-700 tokens took 4-5 percent less time with it); the weight gradient ``dW = g^T x`` (full
fine-tuning) and ``db = Σ g`` stay plain ``mm``/``sum``.

Numerics: both are IEEE float32 products with float32 accumulation; they add the ``in`` products
in different orders, so outputs differ in the last bits (max |error| against float64 at
``(609, 896) x (896, 4864)``: 4.5e-6 for oneDNN, 1.8e-6 for MKL, on values of size ~5; mean
2.6e-7 and 1.7e-7). A run under ``--linear_kernel default`` computes exactly what
transformers' own forward computes.

Under mixed precision (bf16/fp16 autocast) the matmuls already run in the low precision through
oneDNN, but autocast casts every float32 weight to that precision at every call: it keeps no cast
of a weight that needs no gradient. Under LoRA that is every base weight, every step (and again
for a DPO reference pass), about 2 GB of memory traffic per step at 0.5B. So on a CPU under
autocast, a *frozen* float32 weight of a linear layer is cast once and its copy kept
(:func:`cast_weight`) for as long as the weight is unchanged (the same version counter and
storage): the same bits autocast would compute, without the traffic. A Qwen2-0.5B-shaped LoRA
decoder, forward + backward over four lengths of 413-700 tokens in bf16, took 16.9 instead of
18.9 s (``benchmarks/linear_kernels.py``, median of three alternated rounds; an earlier probe:
15.1 against 16.1 s). The copies live where autocast's casts lived anyway (autograd keeps
a frozen layer's cast weight for the input gradient), so the step's peak does not grow; they are
not made under ``--gradient_checkpointing true`` or ``--selective_checkpointing true``, which
replay the casts to keep memory down, nor for a separate reference model (its forward keeps
nothing, so copies would add memory).

Most published checkpoints are saved in bf16, so their float32 weights are bf16 values exactly.
Such a frozen weight (one only its linear layer reads: not a tied or LM-head weight, not a DoRA
layer's base) is not copied but *stored* in bf16 at its first cast: the same numbers in half the
memory, with no float32 master beside it. A separate reference model's exact weights are stored
too (halving that model's linear weights), unless TR-DPO's ``--sync_ref_model`` mixes the policy
into it. Outside autocast the layer upcasts a stored weight (exactly); when training ends the
trainer gives every stored weight its float32 tensor back (:func:`release_cast_copies`), so what
runs and is saved afterwards sees the model it loaded.

``--linear_kernel``:

* ``auto`` (default), on a CPU: oneDNN for every float32 ``nn.Linear`` of the trained model (and
  of a separate reference model) when this PyTorch has the oneDNN op and it agrees with
  ``F.linear`` on a probe; under mixed precision, ``F.linear`` with frozen weights cast once
  (``cast_once``). ``F.linear`` everywhere else (GPUs, bf16 or fp16 weights).
* ``onednn``: the same, but stop with an error when the op is missing instead of falling back.
* ``default``: ``F.linear`` everywhere, as transformers runs it.

:func:`linear` is the oneDNN-or-``F.linear`` functional form and :func:`cast_weight` the kept
cast (the LM head's chunks call both); :func:`enable_linear_kernel` gives a model's ``nn.Linear``
modules an instance ``forward`` that runs the chosen kernel (undone by
:func:`disable_linear_kernel`).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .errors import PreftuneError
from .hf_helpers import is_forward_wrapped, unwrap_forward, unwrap_model, wrap_forward

__all__ = [
    "LINEAR_KERNEL_CHOICES", "onednn_available", "onednn_applies", "linear", "cast_weight", "resolve_linear_kernel", "linear_kernel_of",
    "enable_linear_kernel", "disable_linear_kernel", "release_cast_copies",
]


LINEAR_KERNEL_CHOICES = ("auto", "onednn", "default")


def _onednn_op():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return getattr(mkldnn, "_linear_pointwise", None) if mkldnn is not None else None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x weight^T + bias`` by oneDNN's matmul (no autograd; the caller checked it applies)."""
    return _onednn_op()(x, weight, bias, "none", [], "")


def _input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dx = g W`` of ``y = x W^T``, as oneDNN's ``linear(g, W^T)``: measured 4-5 percent of a LoRA
    step faster than MKL's ``g @ W``, most at down_proj's (896, 4864) weight (173-177 against
    138-149 GFLOP/s)."""
    return _onednn_linear(grad, weight.t())


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this PyTorch can run a float32 linear through oneDNN on the CPU, and its result on
    a ``(5, 37) x (37, 11)`` probe with a bias agrees with ``F.linear`` to float32 rounding."""
    if not torch.backends.mkldnn.is_available():
        return False
    op = _onednn_op()
    if op is None:
        return False
    try:
        return _probe()
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


def _probe() -> bool:
    with torch.autocast("cpu", enabled=False), torch.no_grad():  # the first call may come from inside an autocast region
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 37, generator=gen)
        w = torch.randn(11, 37, generator=gen)
        b = torch.randn(11, generator=gen)
        got = _onednn_linear(x, w, b)
        return got.shape == (5, 11) and got.dtype == torch.float32 and torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` would run oneDNN for these operands: all float32 plain tensors on
    the CPU, ``x`` at least 2-D and not empty, CPU autocast off, and the op available."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and x.dim() >= 2
        and x.numel() > 0
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and onednn_available()
    )


class _OneDNNLinear(torch.autograd.Function):
    """``y = x W^T + b`` through oneDNN; backward ``dx = g W`` (oneDNN), ``dW = g^T x`` (``mm``),
    ``db = Σ g``. Keeps ``x`` only when ``W`` needs a gradient and ``W`` only when ``x`` does,
    as ``F.linear`` does (a frozen LoRA base layer keeps nothing of its own)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = _input_grad(grad, weight) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1]) if need_w or need_b else None
        grad_w = flat.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = flat.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


@dataclass
class _Kept:
    """What :data:`_CAST_ONCE` knows of one registered frozen float32 tensor."""

    storable: bool  # used only through these layers: may itself hold the low-precision values
    keep_copy: bool = True  # False: store when exact, else leave the cast to autocast (no copy kept)
    key: tuple | None = None  # (version, data_ptr, dtype) the kept copy was made from
    copy: torch.Tensor | None = None
    stored: bool = False  # the tensor itself now holds its (exact) low-precision values


_CAST_ONCE = WeakIdKeyDictionary()
"""Frozen float32 tensors (weights and biases of the layers :func:`enable_linear_kernel` gave
``cast_once``) -> :class:`_Kept`. Keyed by identity, weakly: a weight that goes away takes its
copy with it."""


def _kept_copy(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The low-precision ``dtype`` version of registered frozen tensor ``t``, or None when ``t`` is
    not one: ``t`` itself once it is stored in ``dtype``, else the kept copy (made now if ``t``
    changed in place or moved since, or was never cast).

    The first cast of a storable tensor that ``dtype`` represents exactly (a checkpoint saved in
    bf16 and loaded in float32, as most published models are) replaces the float32 values in the
    tensor itself: the same numbers in half the memory, and no second copy."""
    if t is None or dtype == torch.float32 or t.requires_grad:
        return None
    kept = _CAST_ONCE.get(t)
    if kept is None:
        return None
    if kept.stored:
        return t if t.dtype == dtype else None
    if t.dtype != torch.float32:
        return None
    key = (t._version, t.data_ptr(), dtype)
    if kept.key != key:
        copy = t.detach().to(dtype)
        if kept.storable and torch.equal(copy.float(), t):
            t.data = copy
            kept.stored, kept.key, kept.copy = True, None, None
            return t
        kept.key, kept.copy = key, copy if kept.keep_copy else None
    return kept.copy


def _float32_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as float32 for a caller outside autocast: a stored tensor upcast (exactly), else ``t``."""
    if t is not None and t.dtype != torch.float32:
        kept = _CAST_ONCE.get(t)
        if kept is not None and kept.stored:
            return t.float()
    return t


def cast_weight(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, from the kept copy when ``t`` is a frozen float32 tensor of a ``cast_once``
    layer (the LM head's chunks: their weight is a linear layer's)."""
    kept = _kept_copy(t, dtype)
    return t.to(dtype) if kept is None else kept


def _cast_once_forward(self, x):
    """The instance ``forward`` ``cast_once`` gives an ``nn.Linear``: ``F.linear``, under autocast
    with the frozen weight and bias taken from their kept copies (autocast then casts only
    ``x``); outside autocast with a stored weight upcast to float32 (the same values)."""
    weight, bias = self.weight, self.bias
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        kept_weight, kept_bias = _kept_copy(weight, dtype), _kept_copy(bias, dtype)
        weight = weight if kept_weight is None else kept_weight
        bias = bias if kept_bias is None else kept_bias
    elif x.dtype == torch.float32:
        weight, bias = _float32_view(weight), _float32_view(bias)
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN when :func:`onednn_applies`."""
    if onednn_applies(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_forward(self, x):
    """The instance ``forward`` ``onednn`` gives an ``nn.Linear``."""
    return linear(x, self.weight, self.bias)


class _OneDNNLoRALinear(torch.autograd.Function):
    """A LoRA layer in one node: ``y = x W^T + b + s (x A^T) B^T`` with ``A`` ``(r, in)``, ``B``
    ``(out, r)``, ``s`` the adapter's scaling.

    Forward: ``x W^T + b`` and ``xa = x A^T`` ``(..., r)`` through oneDNN, then ``y = (x W^T + b) +
    s xa B^T`` in one ``addmm``. PEFT's own forward makes three ``(..., out)`` tensors after the
    base layer's (``B``'s output, its scaled copy, the sum) and the backward one more (the scaled
    gradient) plus the sum of two input gradients; a decoder forward + backward of a 0.5B model
    with LoRA on every projection took 4-7 percent less time in one node (413-700 tokens).

    Backward, with ``g = dL/dy`` and ``gxa = s g B`` ``(..., r)``::

        dx = g W + gxa A      (oneDNN, then addmm_ in place)
        dA = gxa^T x          dB = s g^T xa          dW = g^T x          db = Σ g

    Keeps ``x`` (for ``dA``) and ``xa`` (for ``dB``), as PEFT's ``A`` and ``B`` layers do.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        need_x, need_w, _, need_a, need_b, _ = ctx.needs_input_grad
        base = _onednn_linear(x, weight, bias)
        xa = _onednn_linear(x, lora_a)
        # out of place: selective checkpointing may have cached ``base`` (an in-place add would be refused)
        y = torch.addmm(base.reshape(-1, base.shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_b.t(), alpha=scaling).view(base.shape)
        ctx.save_for_backward(x if need_a or need_w else None, xa if need_b else None, weight if need_x else None,
                              lora_a if need_x else None, lora_b if need_x or need_a else None)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        flat = grad.reshape(-1, grad.shape[-1])
        gxa = flat.mm(lora_b).mul_(ctx.scaling) if need_x or need_a else None
        grad_x = None
        if need_x:
            grad_x = _input_grad(grad, weight).contiguous()
            grad_x.view(-1, grad_x.shape[-1]).addmm_(gxa, lora_a)
        flat_x = x.reshape(-1, x.shape[-1]) if x is not None else None
        grad_w = flat.t().mm(flat_x) if need_w else None
        grad_bias = flat.sum(0) if ctx.has_bias and need_bias else None
        grad_a = gxa.t().mm(flat_x) if need_a else None
        grad_b = flat.t().mm(xa.reshape(-1, xa.shape[-1])).mul_(ctx.scaling) if need_b else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def _plain_lora_adapter(layer):
    """``(A, B, scaling)`` when PEFT LoRA layer ``layer`` computes exactly ``base(x) + s B(A(x))``
    right now: one active adapter, not merged, adapters enabled, no variant (DoRA), no dropout in
    effect, bias-free plain ``nn.Linear`` ``A`` and ``B``, a plain ``nn.Linear`` base; else None."""
    if layer.disable_adapters or layer.merged or type(layer.base_layer) is not torch.nn.Linear:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training))):
        return None
    a, b = layer.lora_A[name], layer.lora_B[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None:
        return None
    return a.weight, b.weight, float(layer.scaling[name])


def _onednn_lora_forward(self, x, *args, **kwargs):
    """The instance ``forward`` :func:`enable_linear_kernel` gives a PEFT LoRA ``Linear``: one
    :class:`_OneDNNLoRALinear` node where :func:`_plain_lora_adapter` and :func:`onednn_applies`
    hold, PEFT's own forward otherwise (adapters disabled for a DPO reference, DoRA, dropout,
    several adapters, extra arguments)."""
    adapter = None if args or kwargs else _plain_lora_adapter(self)
    if adapter is not None:
        base = self.base_layer
        lora_a, lora_b, scaling = adapter
        if onednn_applies(x, base.weight, base.bias) and onednn_applies(x, lora_a) and lora_b.dtype == torch.float32:
            return _OneDNNLoRALinear.apply(x, base.weight, base.bias, lora_a, lora_b, scaling)
    return type(self).forward(self, x, *args, **kwargs)


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return Linear


_FORWARDS = (_linear_forward, _onednn_lora_forward, _cast_once_forward)


def resolve_linear_kernel(choice: str, device: torch.device | str, mixed_precision: bool = False) -> str:
    """``"onednn"``, ``"cast_once"`` or ``"default"`` for ``--linear_kernel choice`` on ``device``
    (see the module docstring): ``default`` off the CPU; ``cast_once`` under mixed precision
    (autocast runs the linears in bf16/fp16, through oneDNN already); ``onednn`` where the op is
    missing stops with a :class:`PreftuneError` naming the fix."""
    if choice == "default" or torch.device(device).type != "cpu":
        return "default"
    if mixed_precision:
        return "cast_once"
    if onednn_available():
        return "onednn"
    if choice == "onednn":
        raise PreftuneError("--linear_kernel onednn: this PyTorch build has no oneDNN linear on the CPU; use --linear_kernel auto or default")
    return "default"


def linear_kernel_of(args) -> str:
    """:func:`resolve_linear_kernel` for a run's :class:`preftune.config.PreftuneConfig` (its
    ``--linear_kernel``, device, and ``--bf16``/``--fp16`` as resolved). ``cast_once`` gives way
    to ``default`` under full or ``true`` selective checkpointing: they replay the casts so that
    no layer's cast weight outlives its use, and kept copies would undo that memory saving."""
    kernel = resolve_linear_kernel(args.linear_kernel, args.device, bool(args.bf16 or args.fp16))
    if kernel == "cast_once" and (args.gradient_checkpointing or args.selective_checkpointing == "true"):
        return "default"
    return kernel


def enable_linear_kernel(model: torch.nn.Module, kernel: str, keep_copies: bool = True) -> int:
    """Run ``model``'s linear layers with ``kernel`` (:func:`resolve_linear_kernel`'s answer);
    returns how many layers run it. ``keep_copies=False`` (``cast_once``, a separate reference
    model): only weights bf16 holds exactly are stored in it, the others are cast by autocast at
    every call as before (a copy would add half the model's float32 size).

    ``onednn``: every ``nn.Linear`` of ``model`` (exactly that class: quantized layers are others;
    LoRA's base layer and its ``A``/``B`` are plain ``nn.Linear``) gets an instance ``forward``
    that runs :func:`linear`, and every PEFT LoRA ``Linear`` one that runs the whole layer as one
    :class:`_OneDNNLoRALinear` node. ``cast_once``: every ``nn.Linear`` with a frozen float32
    weight gets one that runs ``F.linear`` from kept casts under autocast (plain ``F.linear``
    outside it), and its frozen weight and bias are registered for kept casts (storable unless
    :func:`_unstorable_tensors` names them). ``default``: nothing. A layer whose ``forward``
    someone else already replaced on the instance (accelerate's offloading hooks) is left alone.
    """
    if kernel not in ("onednn", "cast_once"):
        return 0
    lora_linear = _lora_linear_class()
    unstorable = _unstorable_tensors(model, lora_linear) if kernel == "cast_once" else set()
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            forward = _linear_forward if kernel == "onednn" else _cast_once_forward
            if kernel == "cast_once":
                if module.weight.requires_grad or module.weight.dtype != torch.float32:
                    continue
                for t in (module.weight, module.bias):
                    if t is not None and not t.requires_grad and t not in _CAST_ONCE:
                        _CAST_ONCE[t] = _Kept(storable=id(t) not in unstorable, keep_copy=keep_copies)
        elif kernel == "onednn" and lora_linear is not None and type(module) is lora_linear:
            forward = _onednn_lora_forward
        else:
            continue
        count += is_forward_wrapped(module, (forward,)) or wrap_forward(module, forward)
    return count


def _unstorable_tensors(model: torch.nn.Module, lora_linear) -> set[int]:
    """ids of the tensors a ``cast_once`` layer must keep in float32 (a copy beside them instead):
    those read by more than these layers. Tensors shared between modules (a tied embedding), the
    output embedding (the LM head's chunks and the engine read it), and the base weight of a DoRA
    layer (PEFT computes its norm from the weight directly)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out = {i for i, n in counts.items() if n > 1}
    get_head = getattr(unwrap_model(model), "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is not None:
        out |= {id(t) for t in head.parameters()}
    for module in model.modules():
        if lora_linear is not None and type(module) is lora_linear and (module.lora_variant or any(module.use_dora.values())):
            out |= {id(t) for t in module.base_layer.parameters()}
    return out


def release_cast_copies(model: torch.nn.Module) -> None:
    """Drop the kept casts of ``model``'s tensors and give stored tensors their float32 values
    back (exactly: the low precision represented them); casts are made again at their next use
    under autocast. The trainer calls it when training ends, and ``--eval_generate`` before it
    generates (outside autocast, where a stored weight would be upcast at every token)."""
    for t in model.parameters():  # only linear layers' weights and biases are ever registered
        kept = _CAST_ONCE.get(t)
        if kept is not None:
            if kept.stored:
                t.data = t.data.float()
            kept.key, kept.copy, kept.stored = None, None, False


def disable_linear_kernel(model: torch.nn.Module) -> None:
    """Undo :func:`enable_linear_kernel`: the class's own ``forward`` again, float32 tensors, no
    kept casts."""
    release_cast_copies(model)
    for module in model.modules():
        unwrap_forward(module, _FORWARDS)
    for t in model.parameters():
        _CAST_ONCE.pop(t, None)
