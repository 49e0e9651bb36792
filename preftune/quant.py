"""bitsandbytes on this machine: 4-/8-bit loading and the 8-bit/paged optimizers, checked before training.

The seeds train with ``--load_in_4bit`` (NF4, double quantization) and ``--optim
paged_adamw_8bit`` on CUDA. bitsandbytes >= 0.45 also runs 4-bit/8-bit layers and 8-bit
optimizers on CPU (0.50.2 checked, see ``docs/peft.md``); paged optimizers fall back to the
non-paged version on CPU (paging only matters for GPU memory). Older builds or other devices may
lack a kernel. Rather than failing on the first step (or deep inside ``from_pretrained``), a run
probes the pieces it will use on a tiny tensor (milliseconds) and stops with one line that says
what works here.

One CPU pitfall is worked around (:func:`keep_4bit_trainable_on_cpu`): on CPUs with AVX512-BF16,
bitsandbytes 0.50 repacks a 4-bit layer's weight for a faster inference kernel the first time the
layer runs in eval mode without gradients, and keeps the repacked weight afterwards. That kernel
has no autograd support, so after the first evaluation every training step silently loses the
gradient through the frozen 4-bit layers (LoRA gradients of earlier layers come out wrong;
measured, and pinned by ``tests/test_peft.py``).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch

from .errors import PreftuneError

logger = logging.getLogger(__name__)

__all__ = ["BNB_OPTIMIZERS", "TORCH_OPTIMIZERS", "check_bitsandbytes", "check_optimizer", "check_quantization", "keep_4bit_trainable_on_cpu"]

# transformers' OptimizerNames values that build a bitsandbytes optimizer (trainer_optimizer.py)
BNB_OPTIMIZERS = (
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix", "ademamix_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_8bit", "lion_32bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
)
# plain PyTorch optimizers that run on every device
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
_INSTALL = "pip install 'preftune[quant]'"


def _bnb_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return "?"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _probe_optimizer(name: str, device: str) -> None:
    """One step of the bitsandbytes optimizer ``name`` (transformers' mapping) on a 4096-element tensor.

    4096 elements: bitsandbytes keeps smaller tensors in 32-bit state (``min_8bit_size``), which
    would not exercise the 8-bit kernels.
    """
    import bitsandbytes.optim as bnb_optim

    if "ademamix" in name:
        cls = bnb_optim.AdEMAMix
    elif "lion" in name:
        cls = bnb_optim.Lion
    elif "rmsprop" in name:
        cls = bnb_optim.RMSprop
    else:
        cls = bnb_optim.AdamW
    kwargs = {"optim_bits": 8 if "8bit" in name else 32}
    if "rmsprop" not in name:
        kwargs["is_paged"] = "paged" in name
    param = torch.nn.Parameter(torch.ones(4096, device=device))
    param.grad = torch.linspace(-1.0, 1.0, 4096, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls([param], lr=1e-2, **kwargs).step()
    if not torch.isfinite(param).all() or torch.equal(param.detach(), torch.ones_like(param)):
        raise RuntimeError("a step left the parameter unchanged or not finite")


def check_optimizer(optim, device: str) -> None:
    """Stop with one line if ``--optim`` is a bitsandbytes optimizer that cannot run on ``device``."""
    name = str(getattr(optim, "value", optim))
    if name not in BNB_OPTIMIZERS:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PreftuneError(f"--optim {name} needs bitsandbytes ({_INSTALL}); or use --optim adamw_torch")
    try:
        _probe_optimizer(name, device)
    except Exception as e:  # any failure of a foreign kernel is reported the same way
        working = []
        for candidate in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit"):
            try:
                _probe_optimizer(candidate, device)
                working.append(candidate)
            except Exception:
                pass
        raise PreftuneError(
            f"--optim {name} does not work on {device} with bitsandbytes {_bnb_version()} ({_first_line(e)}); "
            f"optimizers that work here: {', '.join(TORCH_OPTIMIZERS + tuple(working))}"
        ) from None
    if "paged" in name and device == "cpu":
        logger.info("--optim %s on CPU: bitsandbytes has no paging on CPU and runs the same optimizer unpaged", name)


def check_quantization(model_args, device: str) -> None:
    """Stop with one line if ``--load_in_4bit`` / ``--load_in_8bit`` cannot run on ``device``."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PreftuneError(f"{flag} needs bitsandbytes ({_INSTALL})")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        w = torch.linspace(-1.0, 1.0, 64 * 64, device=device).reshape(64, 64)
        x = torch.ones(2, 64, device=device)
        if model_args.load_in_4bit:
            q, state = F.quantize_4bit(w, quant_type=model_args.bnb_4bit_quant_type, compress_statistics=model_args.use_bnb_nested_quant)
            y = bnb.matmul_4bit(x, q.t(), quant_state=state)
            ok = torch.allclose(y, x @ F.dequantize_4bit(q, state).t(), atol=1e-3)
        else:
            q, scale, _ = F.int8_vectorwise_quant(w.half())
            ok = torch.allclose(q.float() * scale[:, None] / 127, w, atol=0.02)
        if not ok:
            raise RuntimeError("wrong results")
    except Exception as e:
        raise PreftuneError(
            f"{flag} does not work on {device} with bitsandbytes {_bnb_version()} ({_first_line(e)}); "
            "use a CUDA GPU or bitsandbytes >= 0.45 for CPU, or train without quantization (--use_peft alone)"
        ) from None


def check_bitsandbytes(model_args, args, device: str) -> None:
    """Both checks, before any model is loaded."""
    check_quantization(model_args, device)
    check_optimizer(args.optim, device)


def keep_4bit_trainable_on_cpu(model) -> int:
    """Turn off bitsandbytes' eval-time CPU repacking of 4-bit weights (see the module docstring).

    Returns the number of layers changed. Inference on CPU then uses the same dequantize+matmul
    path as training: a little slower, always differentiable.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
