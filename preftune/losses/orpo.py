"""ORPO's odds-ratio term (Hong et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PreferenceLoss, log1mexp

__all__ = ["orpo_loss"]

# Largest average log-prob we feed into log1mexp: a sequence whose every token has probability
# 1 - 1e-7 would otherwise make the odds infinite. float32 can represent this distance from 0.
_MAX_AVG_LOGP = -1e-7


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> PreferenceLoss:
    """ORPO odds-ratio term (Hong et al. 2024, eq. 6-7), without the NLL term.

    ::

        odds(y|x)  = P(y|x) / (1 - P(y|x)),     P(y|x) = exp(mean_t log P(y_t | x, y_<t))
        log_odds   = log odds(y_w|x) - log odds(y_l|x)
                   = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
        L_OR       = -log sigma(log_odds)
        losses     = beta * L_OR                      (per pair)

    The full ORPO objective is ``L = NLL(y_w) + beta * L_OR``; :mod:`preftune.objective` adds the NLL (the method's ``nll_weight``).

    Knob names: our ``beta`` is the paper's lambda and the official code's ``alpha``
    (TRL also calls it ``beta``). Typical values 0.1 (paper) to 0.5.

    Args:
        chosen_logps: ``(B,)`` length-averaged log-prob of each chosen completion (``lc``).
        rejected_logps: ``(B,)`` same for the rejected completion (``lr``).
        beta: weight of the odds-ratio term.

    Rewards follow TRL's definition: ``beta * lc`` and ``beta * lr``.
    """
    lc = chosen_logps.clamp(max=_MAX_AVG_LOGP)
    lr = rejected_logps.clamp(max=_MAX_AVG_LOGP)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    log_sigma = F.logsigmoid(log_odds)
    return PreferenceLoss(
        losses=-beta * log_sigma,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
        log_odds=log_odds.detach(),
        log_odds_ratio=log_sigma.detach(),
    )
