"""preftune: preference alignment of causal language models (ORPO first, DPO and relatives).

Public API::

    from preftune import PreftuneConfig, PreferenceTrainer, orpo_loss
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (when installed) warns at import on CPUs with AVX512-BF16 that it could not fetch
# an optional kernel from the Hugging Face Hub; it falls back to its own kernel, so the warning
# is noise on every command (and the Hub is often unreachable by design).
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# Exports load on first use (PEP 562), so `preftune --help` and `preftune chat` start without
# importing transformers' Trainer stack.
_EXPORTS = {
    "ModelArguments": "config", "DataArguments": "config", "PreftuneConfig": "config", "ORPOConfig": "config",
    "PreferenceTrainer": "trainer", "PreftuneError": "errors", "DataError": "errors",
    "orpo_loss": "losses", "dpo_loss": "losses", "simpo_loss": "losses", "cpo_loss": "losses",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
