"""The model families GGUF export supports, as declarations: llama.cpp architecture, metadata, tensors.

Each :class:`Family` says which transformers ``model_type`` it covers, the llama.cpp architecture
it is written as, and whether the attention's Q and K rows are permuted. Everything else (tensor
names, metadata keys) comes from the ``gguf`` package's tables, the same ones llama.cpp's own
converter uses.

The Q/K permutation. Rotary position embedding rotates pairs of coordinates of every head.
Hugging Face's Llama code pairs coordinate ``i`` with ``i + d/2`` (``rotate_half``), llama.cpp's
``llama`` architecture pairs ``2i`` with ``2i + 1``. So the rows of ``q_proj`` (and ``k_proj``,
with the key/value head count) are reordered, per head of size ``d``::

    W.reshape(n_heads, 2, d/2, n_in).swapaxes(1, 2).reshape(n_heads * d, n_in)

row ``h*d + j*d/2 + i`` (half ``j``, index ``i``) moves to row ``h*d + 2i + j``. Readers of GGUF
(transformers' loader included) undo it. Qwen2 is written as llama.cpp's ``qwen2`` architecture,
which pairs coordinates the way Hugging Face does, so it is not permuted.

RoPE scaling: ``default`` (none), ``linear`` (positions divided by ``factor``, the
``rope.scaling.*`` keys) and ``llama3`` (Llama-3.1's per-frequency scaling, written the way
llama.cpp reads it: a ``rope_freqs.weight`` tensor of divisors ``f_i`` with
``inv_freq_i = base^(-2i/d) / f_i``). Other scaling types are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import PreftuneError

__all__ = ["Family", "FAMILIES", "family_for", "rope_parameters", "llama3_rope_divisors", "permute_for_interleaved_rope"]


@dataclass(frozen=True)
class Family:
    """One supported model family."""

    name: str  # shown to users
    model_types: tuple[str, ...]  # transformers config.model_type values it covers
    gguf_arch: str  # llama.cpp architecture written to general.architecture
    permute_qk: bool  # llama.cpp's rope pairs (2i, 2i+1): reorder q/k rows (module docstring)
    has_qkv_bias: bool = False  # Qwen2's q/k/v projections have biases


LLAMA = Family("Llama", ("llama",), "llama", permute_qk=True)
MISTRAL = Family("Mistral", ("mistral",), "llama", permute_qk=True)  # llama.cpp runs Mistral as its llama architecture
QWEN2 = Family("Qwen2", ("qwen2",), "qwen2", permute_qk=False, has_qkv_bias=True)
FAMILIES = (LLAMA, MISTRAL, QWEN2)
ROPE_TYPES = ("default", "linear", "llama3")


def supported_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_for(config) -> Family:
    """The family of a transformers config, or a one-line refusal naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            _check_config(family, config)
            return family
    raise PreftuneError(f"GGUF export supports the {supported_names()} families; this model is {model_type!r}")


def rope_parameters(config) -> dict:
    """``{"rope_type", "rope_theta", ...}`` from a transformers 5 config (or a 4.x-style one)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _check_config(family: Family, config) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PreftuneError(f"this {family.name} model uses the {config.hidden_act!r} activation; llama.cpp's {family.gguf_arch} architecture computes SiLU")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise PreftuneError(f"this {family.name} model has attention or MLP biases (attention_bias/mlp_bias), which GGUF export does not write")
    rope = rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise PreftuneError(f"RoPE scaling {rope['rope_type']!r} is not supported by GGUF export (supported: {', '.join(ROPE_TYPES)})")
    if family.permute_qk and head_dim(config) % 2:
        raise PreftuneError(f"head dimension {head_dim(config)} is odd; rotary embeddings need an even one")


def permute_for_interleaved_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows (or bias entries) from rotate-half pairing to interleaved pairs."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_divisors(rope: dict, dim: int) -> np.ndarray:
    """Llama-3.1 RoPE scaling as llama.cpp's per-frequency divisors ``f_i`` (shape ``(dim/2,)``).

    With ``w_i = base^(-2i/d)`` (radians per position), wavelength ``lambda_i = 2 pi / w_i``,
    ``L = original_max_position_embeddings``, ``s = factor``, ``lo/hi = low/high_freq_factor``:
    ``f_i = 1`` when ``lambda_i < L/hi`` (high frequencies kept), ``f_i = s`` when
    ``lambda_i > L/lo`` (low frequencies slowed down ``s`` times), and in between
    ``1 / ((1 - g)/s + g)`` with ``g = (L/lambda_i - lo) / (hi - lo)``: the scaled frequency
    ``w_i / f_i`` interpolates linearly between ``w_i / s`` and ``w_i``.
    """
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    divisors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < old_context / high:
            divisors.append(1.0)
        elif wavelength > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)
