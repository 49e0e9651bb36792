"""The result type every preference loss returns, and ``log1mexp``."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["PreferenceLoss", "log1mexp"]


class PreferenceLoss(NamedTuple):
    """Per-pair result of a preference loss. All tensors have shape ``(B,)``.

    ``losses`` is the preference part only; methods that add an NLL term (ORPO, CPO) add it in
    the trainer from the same per-token log-probs, because the NLL may be normalised per token
    across the whole batch rather than per pair.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached
    log_odds: torch.Tensor | None = None  # ORPO only: log odds ratio, detached
    log_odds_ratio: torch.Tensor | None = None  # ORPO only: log sigma(log odds), detached


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range.

    Maechler (2012), "Accurately computing log(1 - exp(-|a|))": use ``log(-expm1(x))`` when
    ``x > -log 2`` (``exp(x)`` close to 1, where ``1 - exp(x)`` cancels) and ``log1p(-exp(x))``
    otherwise (``exp(x)`` tiny, where ``expm1`` would lose the digits of the 1).
    At ``x = 0`` the result is ``-inf`` (a sequence with probability 1 has infinite odds);
    callers clamp log-probs to stay strictly negative.
    """
    threshold = -math.log(2.0)
    # Evaluate both branches on inputs that are safe for each, so neither produces NaN gradients.
    near_zero = x > threshold
    safe_near = torch.where(near_zero, x, torch.full_like(x, threshold))
    safe_far = torch.where(near_zero, torch.full_like(x, threshold), x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))
