"""DPO and its loss variants (TRL's ``loss_type`` names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PreferenceLoss

__all__ = ["dpo_loss", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


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
