"""KTO and unpaired APO-zero: losses for single completions labelled desirable or undesirable.

Ethayarajh et al. 2024, *KTO: Model Alignment as Prospect Theoretic Optimization*,
arXiv:2402.01306, eq. 7-8, in TRL 1.16's ``KTOTrainer`` form. Each example is a prompt ``x``, a
completion ``y`` and a label (desirable or not). With summed completion log-probs::

    r   = log π(y|x) − log π_ref(y|x)                       implied reward / β
    z   = max(0, mean_j [log π(y'_j|x_j) − log π_ref(y'_j|x_j)])   KL estimate, no gradient
    desirable:    λ_D · (1 − σ(β (r − z)))
    undesirable:  λ_U · (1 − σ(β (z − r)))

``y'_j`` is a *mismatched* completion (another example's, see :mod:`preftune.data.unpaired`), so
``z`` estimates KL(π || π_ref) over the batch; the mean runs over every example of the set the
estimate is taken over (a batch, or a gradient-accumulation window). λ_D/λ_U are
``desirable_weight``/``undesirable_weight``; β is ``beta``.

``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, *Anchored Preference Optimization*, eq. 7,
unpaired): desirable ``λ_D (1 − σ(β r))``, undesirable ``λ_U σ(β r)``; no KL term.

Rewards (metrics) are ``β r`` for every example (detached).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KTOLoss", "KTO_LOSS_TYPES", "kto_loss", "kl_estimate", "class_weight_advice"]

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLoss(NamedTuple):
    """Per-example result, ``(B,)`` each: ``losses`` (weighted) and ``rewards`` ``β r`` (detached)."""

    losses: torch.Tensor
    rewards: torch.Tensor


def kl_estimate(kl_logratios: torch.Tensor) -> torch.Tensor:
    """``z = max(0, mean_j kl_logratios_j)``, a detached scalar.

    ``kl_logratios`` ``(N,)``: ``log π(y'_j|x_j) − log π_ref(y'_j|x_j)`` of the mismatched
    (KL) completions of the ``N`` examples the estimate is taken over.
    """
    return kl_logratios.detach().mean().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO or unpaired APO-zero per example (see the module docstring).

    Args:
        logps, ref_logps: ``(B,)`` policy and reference log-probs of each completion, summed.
        desirable: ``(B,)`` bool, True for a desirable (thumbs-up) example.
        kl: the KL estimate ``z`` (:func:`kl_estimate`, ignored by ``apo_zero_unpaired``).
        beta: β.
        loss_type: ``kto`` or ``apo_zero_unpaired``.
        desirable_weight, undesirable_weight: λ_D and λ_U.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; choose one of {', '.join(KTO_LOSS_TYPES)}")
    desirable = desirable.bool()
    logratio = logps - ref_logps
    if loss_type == "kto":
        z = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device).detach()
        good = 1 - torch.sigmoid(beta * (logratio - z))
        bad = 1 - torch.sigmoid(beta * (z - logratio))
    else:
        good = 1 - torch.sigmoid(beta * logratio)
        bad = torch.sigmoid(beta * logratio)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return KTOLoss(losses=losses, rewards=(beta * logratio).detach())


def class_weight_advice(num_desirable: int, num_examples: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """A warning when the class balance calls for other weights, else None (TRL 1.16's rule).

    KTO paper eq. 8 suggests ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``. With ``n_D != n_U`` and
    neither weight in its range (the other held fixed), the advice is either
    ``λ_D ∈ [n_U λ_U / n_D, 1.33 n_U λ_U / n_D]`` or ``λ_U ∈ [n_D λ_D / (1.33 n_U), n_D λ_D / n_U]``,
    rounded to 2 decimals. As in TRL, ``n_D = max(desirable, 1)`` and ``n_U = max(examples − n_D, 1)``.
    """
    n_d = max(num_desirable, 1)
    n_u = max(num_examples - n_d, 1)
    if n_d == n_u:
        return None
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi:
        return None
    return (f"KTO: {n_d} desirable vs {n_u} undesirable examples, and --desirable_weight {desirable_weight:g} / --undesirable_weight "
            f"{undesirable_weight:g} do not balance them (KTO paper eq. 8); set either --desirable_weight in [{d_lo}, {d_hi}] "
            f"or --undesirable_weight in [{u_lo}, {u_hi}], not both")
