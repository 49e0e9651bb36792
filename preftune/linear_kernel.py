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

The backward's input gradient ``g W`` has no transpose and runs as fast in MKL as in oneDNN, so
the backward keeps plain ``matmul``/``mm``: ``dx = g W``, ``dW = g^T x``, ``db = Σ g``.

Numerics: both are IEEE float32 products with float32 accumulation; they add the ``in`` products
in different orders, so outputs differ in the last bits (max |error| against float64 at
``(609, 896) x (896, 4864)``: 4.5e-6 for oneDNN, 1.8e-6 for MKL, on values of size ~5; mean
2.6e-7 and 1.7e-7). A run under ``--linear_kernel default`` computes exactly what
transformers' own forward computes.

``--linear_kernel``:

* ``auto`` (default): oneDNN for every float32 ``nn.Linear`` of the trained model (and of a
  separate reference model) while the trainer runs on a CPU, when this PyTorch has the oneDNN
  op and it agrees with ``F.linear`` on a probe; ``F.linear`` everywhere else (GPUs, bf16 or
  fp16 weights, under autocast: autocast's bf16 matmuls already run through oneDNN on a CPU).
* ``onednn``: the same, but stop with an error when the op is missing instead of falling back.
* ``default``: ``F.linear`` everywhere.

:func:`linear` is the functional form (the LM head's chunks call it), :func:`enable_onednn_linear`
gives a model's ``nn.Linear`` modules an instance ``forward`` that calls it (undone by
:func:`disable_onednn_linear`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .errors import PreftuneError
from .hf_helpers import is_forward_wrapped, unwrap_forward, wrap_forward

__all__ = [
    "LINEAR_KERNEL_CHOICES", "onednn_available", "onednn_applies", "linear", "resolve_linear_kernel", "enable_onednn_linear", "disable_onednn_linear",
]


LINEAR_KERNEL_CHOICES = ("auto", "onednn", "default")


def _onednn_op():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return getattr(mkldnn, "_linear_pointwise", None) if mkldnn is not None else None


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
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 37, generator=gen)
        w = torch.randn(11, 37, generator=gen)
        b = torch.randn(11, generator=gen)
        got = op(x, w, b, "none", [], "")
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False
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
    """``y = x W^T + b`` forward through oneDNN; backward ``dx = g W``, ``dW = g^T x``, ``db = Σ g``
    (plain matmuls). Keeps ``x`` only when ``W`` needs a gradient and ``W`` only when ``x`` does,
    as ``F.linear`` does (a frozen LoRA base layer keeps nothing of its own)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return _onednn_op()(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = grad.matmul(weight) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1]) if need_w or need_b else None
        grad_w = flat.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = flat.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN when :func:`onednn_applies`."""
    if onednn_applies(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_linear_forward(self, x):
    """The instance ``forward`` :func:`enable_onednn_linear` gives an ``nn.Linear``."""
    return linear(x, self.weight, self.bias)


def resolve_linear_kernel(choice: str, device: torch.device | str, mixed_precision: bool = False) -> str:
    """``"onednn"`` or ``"default"`` for ``--linear_kernel choice`` on ``device`` (see the module
    docstring): ``default`` off the CPU and under mixed precision (autocast runs the linears in
    bf16/fp16, through oneDNN already); ``onednn`` where the op is missing stops with a
    :class:`PreftuneError` naming the fix."""
    if choice == "default" or torch.device(device).type != "cpu" or mixed_precision:
        return "default"
    if onednn_available():
        return "onednn"
    if choice == "onednn":
        raise PreftuneError("--linear_kernel onednn: this PyTorch build has no oneDNN linear on the CPU; use --linear_kernel auto or default")
    return "default"


def enable_onednn_linear(model: torch.nn.Module) -> int:
    """Give every ``nn.Linear`` of ``model`` (exactly that class: quantized and LoRA layers are
    other classes; LoRA's base layer and its ``A``/``B`` are plain ``nn.Linear``) an instance
    ``forward`` that runs :func:`linear`. A layer whose ``forward`` someone else already replaced
    on the instance (accelerate's offloading hooks) is left alone. Returns how many layers run it."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and (is_forward_wrapped(module, (_onednn_linear_forward,)) or wrap_forward(module, _onednn_linear_forward)):
            count += 1
    return count


def disable_onednn_linear(model: torch.nn.Module) -> None:
    """Undo :func:`enable_onednn_linear`."""
    for module in model.modules():
        unwrap_forward(module, (_onednn_linear_forward,))
