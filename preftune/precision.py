"""Mixed precision that fits the hardware: what ``--bf16 auto`` (the default) chooses, and why.

``--bf16`` takes ``true``, ``false`` or ``auto``. ``auto`` turns bf16 mixed precision on where
the device runs bf16 matmuls fast and off elsewhere:

* CUDA: GPUs with native bf16 (compute capability 8.0 and later, ``torch.cuda.is_bf16_supported``);
* CPU: x86 CPUs with AVX512-BF16 or AMX-BF16 (read from ``/proc/cpuinfo``'s flags; on the
  project's machine a bf16 matmul runs about 2.8x faster than fp32); other CPUs stay fp32, where
  bf16 is emulated and slower than fp32.

``auto`` is the default: on the project's AVX512-BF16 CPU bf16 trained the tiny ORPO benchmark
1.3x and a Qwen2-0.5B-shaped LoRA model 1.75x faster than fp32, its first-step loss 3.2e-5 and
4.6e-5 relative from fp32's (docs/benchmarks.md). The price: which precision a run uses, and so
its numbers, depends on the machine; ``--bf16 false`` runs the same fp32 path everywhere.

Mixed precision means: weights, gradients and optimizer state stay fp32; matmuls run in bf16
under ``torch.autocast``; the LM head's log-softmax and the loss stay fp32
(:mod:`preftune.logprobs`). On a CPU, ``--bf16 true`` needs no ``--use_cpu`` (the config sets it
when no accelerator is present). An explicit ``--fp16 true`` wins over ``auto`` (auto then
means "not bf16"); on a CPU it runs fp32, as accelerate has no fp16 autocast there, and the
start-up line says so."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PrecisionChoice", "resolve_precision", "fast_bf16", "cpu_flags", "BF16_CHOICES"]

BF16_CHOICES = ("true", "false", "auto")


@dataclass(frozen=True)
class PrecisionChoice:
    """The run's mixed precision: ``bf16`` / ``fp16`` as TrainingArguments take them, and why."""

    bf16: bool
    fp16: bool
    reason: str

    def describe(self) -> str:
        mode = "bf16 mixed precision" if self.bf16 else "fp16 mixed precision" if self.fp16 else "fp32 compute"
        return f"{mode} ({self.reason})"

    def autocast(self, device_type: str):
        """The autocast context of this choice on ``device_type``: the one accelerate enters for
        the Trainer's forward (``torch.autocast`` in bf16 or fp16), a no-op for fp32. For forwards
        outside the Trainer that must match its numbers (the precomputed DPO reference)."""
        if not (self.bf16 or self.fp16):
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16 if self.bf16 else torch.float16)


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def fast_bf16(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` (``cuda``/``cpu``) runs bf16 matmuls faster than fp32, and why."""
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            major, minor = torch.cuda.get_device_capability()
            return major >= 8, f"GPU {'has' if major >= 8 else 'lacks'} native bf16 (compute capability {major}.{minor})"
        return False, "GPU lacks native bf16"
    if device_type == "cpu":
        flags = cpu_flags()
        found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
        if found:
            return True, f"CPU has {' and '.join(found)}"
        return False, "CPU lacks AVX512-BF16 and AMX-BF16, where bf16 is emulated and slower"
    return False, f"no bf16 rule for device {device_type!r}"


def parse_bf16(value) -> str:
    """``--bf16`` as one of true/false/auto (bools and the usual yes/no spellings accepted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y"):
        return "true"
    if text in ("false", "0", "no", "n"):
        return "false"
    if text == "auto":
        return "auto"
    raise ValueError(f"--bf16 must be true, false or auto, got {value!r}")


def resolve_precision(bf16, fp16: bool, device_type: str) -> PrecisionChoice:
    """Resolve ``--bf16 true|false|auto`` and ``--fp16`` for ``device_type``. Beside ``--fp16
    true``, ``auto`` (the default) means "not bf16"; ``--bf16 true`` is a conflict. The reason of
    an ``auto`` choice names the flag for the other precision, e.g. ``auto: CPU has AVX512-BF16;
    --bf16 false for fp32``."""
    mode = parse_bf16(bf16)
    if fp16:
        if mode == "true":
            raise ValueError("choose one of --bf16 true and --fp16 true")
        if device_type == "cpu":  # accelerate has no fp16 autocast on a CPU: the run computes in fp32, say so
            return PrecisionChoice(False, False, "--fp16 true, which a CPU runs as fp32; --bf16 true for mixed precision")
        return PrecisionChoice(False, True, "--fp16 true")
    if mode == "auto":
        fast, why = fast_bf16(device_type)
        return PrecisionChoice(fast, False, f"auto: {why}; --bf16 {'false for fp32' if fast else 'true for bf16'}")
    return PrecisionChoice(mode == "true", False, f"--bf16 {mode}")
