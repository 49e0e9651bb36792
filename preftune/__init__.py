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

from .config import DataArguments, ModelArguments, ORPOConfig, PreftuneConfig  # noqa: E402
from .errors import DataError, PreftuneError  # noqa: E402
from .losses import cpo_loss, dpo_loss, orpo_loss, simpo_loss  # noqa: E402
from .trainer import PreferenceTrainer  # noqa: E402

__all__ = [
    "__version__", "ModelArguments", "DataArguments", "PreftuneConfig", "ORPOConfig", "PreferenceTrainer",
    "PreftuneError", "DataError", "orpo_loss", "dpo_loss", "simpo_loss", "cpo_loss",
]
