"""Small rules about Hugging Face objects that several modules need, each written once.

* :func:`unwrap_model`: the transformers model inside PEFT, DDP/FSDP/DeepSpeed and
  ``torch.compile`` wrappers; :func:`find_peft_model`: the ``peft.PeftModel`` inside the
  distributed/compile wrappers (the reference with adapters disabled needs it).
* :func:`pad_token_id`: the id used to pad batches (padding never enters a loss: positions are
  scored explicitly, so any id works; the pad token, else EOS, else 0).
* :data:`TORCH_DTYPES` / :func:`torch_dtype_of`: the ``--torch_dtype`` names and their dtypes.
* :func:`has_chat_template`: whether a tokenizer carries a chat template.
* :func:`wrap_forward` / :func:`is_forward_wrapped` / :func:`unwrap_forward`: a module's
  ``forward`` replaced on the instance (selective checkpointing, the oneDNN linear), bound with
  ``types.MethodType`` so a deep copy rebinds to the copy, and only over the class's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where needed, so config parsing stays light
    from torch import nn

__all__ = [
    "unwrap_model", "find_peft_model", "pad_token_id", "TORCH_DTYPES", "torch_dtype_of", "has_chat_template", "wrap_forward", "is_forward_wrapped",
    "unwrap_forward",
]

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")

_MAX_WRAPPER_DEPTH = 8  # PEFT inside DDP inside torch.compile is three; more means a cycle


def _strip_one_wrapper(model: "nn.Module") -> "nn.Module | None":
    """The module directly inside a DDP/FSDP/DeepSpeed (``.module``) or compile (``._orig_mod``)
    wrapper, or None when ``model`` is not such a wrapper."""
    from torch import nn

    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def unwrap_model(model: "nn.Module") -> "nn.Module":
    """Strip PEFT, distributed and ``torch.compile`` wrappers to reach the transformers model."""
    for _ in range(_MAX_WRAPPER_DEPTH):
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):  # peft.PeftModel
            model = get_base()
            continue
        inner = _strip_one_wrapper(model)
        if inner is None:
            break
        model = inner
    return model


def find_peft_model(model: "nn.Module | None"):
    """The ``peft.PeftModel`` inside distributed / compile wrappers, or None if there is none."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    for _ in range(_MAX_WRAPPER_DEPTH):
        if model is None or isinstance(model, PeftModel):
            return model
        model = _strip_one_wrapper(model)
    return None


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def torch_dtype_of(name: str):
    """The ``torch.dtype`` named by ``--torch_dtype`` (``float32``, ``bfloat16``, ``float16``);
    None for ``auto`` (the caller's default: see :func:`preftune.model_setup.choose_device`)."""
    import torch

    if name not in TORCH_DTYPES:
        raise ValueError(f"--torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {name!r}")
    return None if name == "auto" else getattr(torch, name)


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def wrap_forward(module: "nn.Module", forward) -> bool:
    """Set ``module.forward`` on the instance to ``forward`` bound to ``module`` (so a deep copy
    rebinds to the copy). Returns False, changing nothing, when the instance already has its own
    ``forward`` (another wrapper's, or accelerate's offloading hooks): wrappers never stack."""
    import types

    if "forward" in vars(module):
        return False
    module.forward = types.MethodType(forward, module)
    return True


def is_forward_wrapped(module: "nn.Module", forwards) -> bool:
    """Whether ``module``'s instance ``forward`` is one of the functions ``forwards``."""
    return getattr(vars(module).get("forward"), "__func__", None) in forwards


def unwrap_forward(module: "nn.Module", forwards) -> None:
    """Remove ``module``'s instance ``forward`` if it is one of ``forwards`` (back to the class's)."""
    if is_forward_wrapped(module, forwards):
        del module.forward
