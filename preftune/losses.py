"""Preference losses as pure functions of per-sequence log-probabilities.

Every function here takes tensors of shape ``(B,)`` (one value per preference pair) and returns a
:class:`PreferenceLoss` whose ``losses`` field is the per-pair loss ``(B,)``. Reduction over the
batch (and over gradient-accumulation windows) is the trainer's job, so that accumulating ``k``
micro-batches gives exactly the update of one ``k``-times larger batch.

Notation used throughout (ORPO paper, Hong et al. 2024, arXiv:2403.07691):

* ``x`` prompt, ``y_w`` chosen ("winning") completion, ``y_l`` rejected ("losing") completion;
* ``lc = (1/|y_w|) sum_t log P(y_w,t | x, y_w,<t)``: length-averaged log-prob of the chosen
  completion (``policy_chosen_logps`` when ``average=True`` in the engine); ``lr`` likewise for
  the rejected completion;
* ``sigma`` is the logistic function.

No function here touches a model, tokenizer or config.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "PreferenceLoss",
    "log1mexp",
    "orpo_loss",
    "dpo_loss",
    "simpo_loss",
    "cpo_loss",
    "DPO_LOSS_TYPES",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


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

    The full ORPO objective is ``L = NLL(y_w) + beta * L_OR``; the trainer adds the NLL.

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


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Direct Preference Optimization and its loss variants, TRL's ``loss_type`` names.

    Log-probs here are **summed** over completion tokens (not averaged), for both the policy
    ``pi`` and the frozen reference ``ref``::

        h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

    * ``sigmoid`` (Rafailov et al. 2023, eq. 7):  ``-log sigma(beta h)``; with label smoothing
      ``eps > 0`` it is conservative DPO (cDPO, Mitchell 2023), TRL's behaviour::

          -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    * ``robust``  (Chowdhury et al. 2024, "Provably Robust DPO"), label-smoothing ``eps``::

          (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)

    * ``ipo``     (Azar et al. 2023, eq. 17):  ``(h - 1 / (2 beta))^2``  (beta is IPO's tau). As in
      TRL, IPO is meant for **length-averaged** log-probs: the objective passes averages here.
    * ``hinge``   (SLiC, Zhao et al. 2023):  ``relu(1 - beta h)``

    Rewards: ``beta * (log pi - log ref)`` for chosen and rejected (detached).

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy summed log-probs.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` reference summed log-probs.
        beta: inverse temperature (DPO's beta).
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: ``eps`` in ``[0, 0.5)``, used by ``sigmoid`` (cDPO) and ``robust``.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def simpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised.

    ::

        L = -log sigma(beta * lc - beta * lr - gamma)

    with ``lc``, ``lr`` **length-averaged** log-probs. Paper's beta (2.0-2.5 typical) is our
    ``beta``; the paper's target reward margin gamma is our ``simpo_gamma`` (0.5-1.5 typical;
    TRL's CPO ``simpo_gamma``). Rewards: ``beta * lc`` and ``beta * lr``.
    """
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma)
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
    )


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> PreferenceLoss:
    """Contrastive Preference Optimization (Xu et al. 2024, eq. 3), preference part.

    ::

        L_prefer = -log sigma(beta * log pi(y_w|x) - beta * log pi(y_l|x))

    with **summed** log-probs, as in the paper and TRL's ``CPOTrainer`` (``loss_type=sigmoid``).
    The full objective adds ``NLL(y_w)``; the trainer adds it (weight ``cpo_alpha``, TRL's name).
    Rewards: ``beta * log pi(y)``.
    """
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps))
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
    )
