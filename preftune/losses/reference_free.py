"""Reference-free losses on the policy's own log-probs: SimPO and CPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PreferenceLoss

__all__ = ["simpo_loss", "cpo_loss"]


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
    The full objective adds ``NLL(y_w)``; :mod:`preftune.objective` adds it (weight ``cpo_alpha``, TRL's name).
    Rewards: ``beta * log pi(y)``.
    """
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps))
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
    )


def slic_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> PreferenceLoss:
    """SLiC-HF's rank calibration loss (Zhao et al. 2023, eq. 2), TRL ``CPOTrainer``'s ``hinge``.

    ::

        L_cal = max(0, 1 - beta * (log pi(y_w|x) - log pi(y_l|x)))

    with **summed** log-probs: a hinge with margin ``1 / beta`` on the log-likelihood gap. The full
    objective adds ``NLL(y_w)`` (SLiC-HF's regularizer; weight ``cpo_alpha``), added by
    :mod:`preftune.objective`. Rewards: ``beta * log pi(y)``.
    """
    losses = torch.relu(1 - beta * (chosen_logps - rejected_logps))
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
    )
