"""DPO and the loss types of TRL 1.16's ``DPOTrainer`` (same names, same definitions).

Every loss type is a pure function of per-pair log-probs ``(B,)``, **summed** over completion
tokens, for the policy ``π`` and the frozen reference ``π_ref``::

    c = log π(y_w|x) − log π_ref(y_w|x)          chosen log-ratio
    r = log π(y_l|x) − log π_ref(y_l|x)          rejected log-ratio
    s_c = f(c), s_r = f(r)                        f-DPO scores (f = identity for reverse KL)
    δ = s_c − s_r                                 score difference (h in the DPO paper)

``β`` is ``beta``, ``ε`` is ``label_smoothing``, ``τ`` is ``discopop_tau``, ``σ`` the logistic
function, ``|y|`` the completion's token count. Per-pair losses (``losses`` of the result):

===============  =================================================================  ==========================
``sigmoid``      ``−log σ(βδ)``; with ε > 0 conservative DPO                          Rafailov et al. 2023 eq. 7;
                 ``−(1−ε) log σ(βδ) − ε log σ(−βδ)`` (TRL 1.16 ignores ε here)       Mitchell 2023 (cDPO)
``hinge``        ``relu(1 − βδ)``                                                      SLiC, Zhao et al. 2023
``ipo``          ``(s_c/|y_w| − s_r/|y_l| − 1/(2β))²`` (β is IPO's τ)                  Azar et al. 2023 eq. 17
``exo_pair``     ``q_w (log q_w − log(1−ε)) + q_l (log q_l − log ε)``,                  Ji et al. 2024 eq. 16
                 ``q_w = σ(βδ)``, ``q_l = σ(−βδ)``; needs ε > 0
``nca_pair``     ``−log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)``                         Chen et al. 2024
``robust``       ``(−(1−ε) log σ(βδ) + ε log σ(−βδ)) / (1 − 2ε)``                     Chowdhury et al. 2024
``bco_pair``     ``−log σ(βc − Δ) − log σ(−(βr − Δ))``; Δ = 0 as in TRL 1.16, or     Jung et al. 2024
                 the running mean of rewards (``reward_shift``)
``sppo_hard``    ``(c − 1/(2β))² + (r + 1/(2β))²``                                     Wu et al. 2024
``aot``          ``−(1−ε) log σ(βd_k) − ε log σ(−βd_k)``, ``d_k`` = k-th smallest      Melnyk et al. 2024
                 policy margin ``log π(y_w) − log π(y_l)`` minus k-th smallest
                 reference margin (pairs matched by rank within the batch)
``aot_unpaired`` the same with ``d_k`` = k-th smallest ``c`` minus k-th smallest ``r``    Melnyk et al. 2024
``apo_zero``     ``1 − σ(βc) + σ(βr)``                                                  D'Oosterlinck et al. 2024 eq. 7
``apo_down``     ``σ(βc) + 1 − σ(β(c − r))``                                            D'Oosterlinck et al. 2024 eq. 8
``discopop``     ``(1 − m)(−log σ(x)) + m e^{−x}``, ``x = βδ``, ``m = σ(x/τ)``          Chris Lu et al. 2024 eq. 5
``sigmoid_norm`` ``−log σ(β (s_c/|y_w| − s_r/|y_l|))``                                 (TRL)
``sft``          the token-mean NLL of the chosen completions; not a per-pair term:
                 the objective adds it (see :mod:`preftune.methods`)
===============  =================================================================  ==========================

f-divergences (Wang et al. 2023, "Beyond Reverse KL", ``f_divergence_type``), applied to each
log-ratio ``u``: ``reverse_kl`` ``u``; ``forward_kl`` ``1 − e^{−u}``; ``js_divergence``
``log 2 + log σ(u)``; ``alpha_divergence`` ``(e^{(α−1)u} − 1)/(α−1)`` with ``(α−1)u`` clamped at
80 (11 for float16), as TRL does, and ``u`` itself when ``|α − 1| < 1e-6``. Only the loss types built
on ``δ`` accept a non-default f-divergence (``F_DIVERGENCE_LOSS_TYPES``).

Rewards (metrics) are ``βc`` and ``βr`` for every loss type (detached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .base import PreferenceLoss

__all__ = [
    "dpo_loss",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "RANK_MATCHED_LOSS_TYPES",
    "RankPartners",
    "f_divergence_scores",
    "rank_partners",
    "wpo_weights",
]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class DPOTerms(NamedTuple):
    """The per-pair quantities ``(B,)`` every loss type is built from (see the module docstring)."""

    chosen_logratio: torch.Tensor  # c
    rejected_logratio: torch.Tensor  # r
    policy_margin: torch.Tensor  # log π(y_w|x) − log π(y_l|x)
    chosen_score: torch.Tensor  # s_c
    rejected_score: torch.Tensor  # s_r
    chosen_count: torch.Tensor  # |y_w|, at least 1
    rejected_count: torch.Tensor  # |y_l|, at least 1
    beta: float
    eps: float  # label_smoothing
    tau: float  # discopop_tau
    reward_shift: float  # bco_pair's Δ
    partners: RankPartners | None  # aot, aot_unpaired

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_score - self.rejected_score


class RankPartners(NamedTuple):
    """What each pair is matched with by the rank-matched loss types (detached, ``(B,)``).

    ``ref_margin``: for ``aot``, the reference margin ``log π_ref(y_w) − log π_ref(y_l)`` whose rank
    among the batch's reference margins equals the rank of this pair's policy margin among the
    policy margins. ``rejected_logratio`` / ``chosen_logratio``: for ``aot_unpaired``, the
    rejected log-ratio of the rank of this pair's chosen log-ratio, and the chosen log-ratio of the
    rank of this pair's rejected log-ratio. The "batch" is whatever set the ranks were taken over:
    a micro-batch, or a whole gradient-accumulation window (see :func:`rank_partners`).
    """

    ref_margin: torch.Tensor
    rejected_logratio: torch.Tensor
    chosen_logratio: torch.Tensor


def rank_partners(policy_margin, ref_margin, chosen_logratio, rejected_logratio, index=None) -> RankPartners:
    """Match pairs by rank over a set of ``N`` pairs (all inputs ``(N,)``, detached).

    Sorting both lists and pairing their k-th elements (TRL's ``torch.sort``) gives each element the
    partner whose rank equals its own. ``index`` ``(B,)`` selects which of the ``N`` pairs to return
    partners for (default: all). Ties are broken by position (stable sort), which changes nothing
    in the loss value.
    """

    def partner_of(keys: torch.Tensor, partner_values: torch.Tensor) -> torch.Tensor:
        order = torch.sort(keys, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        return torch.sort(partner_values, stable=True).values[rank]

    out = RankPartners(
        ref_margin=partner_of(policy_margin.detach(), ref_margin.detach()),
        rejected_logratio=partner_of(chosen_logratio.detach(), rejected_logratio.detach()),
        chosen_logratio=partner_of(rejected_logratio.detach(), chosen_logratio.detach()),
    )
    if index is not None:
        out = RankPartners(*(t[index] for t in out))
    return out


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``−(1−ε) log σ(x) − ε log σ(−x)``."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _sigmoid(t: DPOTerms) -> torch.Tensor:
    return _smoothed_sigmoid(t.beta * t.delta, t.eps)


def _hinge(t: DPOTerms) -> torch.Tensor:
    return torch.relu(1 - t.beta * t.delta)


def _per_token_delta(t: DPOTerms) -> torch.Tensor:
    return t.chosen_score / t.chosen_count - t.rejected_score / t.rejected_count


def _ipo(t: DPOTerms) -> torch.Tensor:
    return (_per_token_delta(t) - 1 / (2 * t.beta)) ** 2


def _exo_pair(t: DPOTerms) -> torch.Tensor:
    x = t.beta * t.delta
    log_qw, log_ql = F.logsigmoid(x), F.logsigmoid(-x)
    return torch.exp(log_qw) * (log_qw - math.log1p(-t.eps)) + torch.exp(log_ql) * (log_ql - math.log(t.eps))


def _nca_pair(t: DPOTerms) -> torch.Tensor:
    c, r = t.beta * t.chosen_logratio, t.beta * t.rejected_logratio
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _robust(t: DPOTerms) -> torch.Tensor:
    x = t.beta * t.delta
    return (-(1 - t.eps) * F.logsigmoid(x) + t.eps * F.logsigmoid(-x)) / (1 - 2 * t.eps)


def _bco_pair(t: DPOTerms) -> torch.Tensor:
    return -F.logsigmoid(t.beta * t.chosen_logratio - t.reward_shift) - F.logsigmoid(-(t.beta * t.rejected_logratio - t.reward_shift))


def _sppo_hard(t: DPOTerms) -> torch.Tensor:
    return (t.chosen_logratio - 0.5 / t.beta) ** 2 + (t.rejected_logratio + 0.5 / t.beta) ** 2


def _aot(t: DPOTerms) -> torch.Tensor:
    # the k-th smallest policy margin meets the k-th smallest reference margin (no gradient)
    return _smoothed_sigmoid(t.beta * (t.policy_margin - t.partners.ref_margin), t.eps)


def _aot_unpaired(t: DPOTerms) -> torch.Tensor:
    # Σ_k ℓ(c_(k) − r_(k)): each chosen log-ratio meets the rejected one of its rank and vice versa.
    # The second sum has zero value and carries the rejected log-ratios' gradient, so the value is
    # counted once and every element gets its exact gradient.
    as_chosen = _smoothed_sigmoid(t.beta * (t.chosen_logratio - t.partners.rejected_logratio), t.eps)
    as_rejected = _smoothed_sigmoid(t.beta * (t.partners.chosen_logratio - t.rejected_logratio), t.eps)
    return as_chosen + (as_rejected - as_rejected.detach())


def _apo_zero(t: DPOTerms) -> torch.Tensor:
    return 1 - torch.sigmoid(t.beta * t.chosen_logratio) + torch.sigmoid(t.beta * t.rejected_logratio)


def _apo_down(t: DPOTerms) -> torch.Tensor:
    return torch.sigmoid(t.beta * t.chosen_logratio) + 1 - torch.sigmoid(t.beta * (t.chosen_logratio - t.rejected_logratio))


def _discopop(t: DPOTerms) -> torch.Tensor:
    x = t.beta * t.delta
    # m e^{-x} written as exp(log σ(x/τ) − x): equal, and finite where e^{-x} alone overflows
    return -F.logsigmoid(x) * torch.sigmoid(-x / t.tau) + torch.exp(F.logsigmoid(x / t.tau) - x)


def _sigmoid_norm(t: DPOTerms) -> torch.Tensor:
    return -F.logsigmoid(t.beta * _per_token_delta(t))


@dataclass(frozen=True)
class _LossType:
    fn: Callable[[DPOTerms], torch.Tensor] | None  # None: not a per-pair term (sft)
    f_divergence: bool  # built on δ, so an f-divergence applies (TRL's list)


_LOSS_TYPES: dict[str, _LossType] = {
    "sigmoid": _LossType(_sigmoid, True),
    "hinge": _LossType(_hinge, True),
    "ipo": _LossType(_ipo, True),
    "exo_pair": _LossType(_exo_pair, True),
    "nca_pair": _LossType(_nca_pair, False),
    "robust": _LossType(_robust, True),
    "bco_pair": _LossType(_bco_pair, False),
    "sppo_hard": _LossType(_sppo_hard, False),
    "aot": _LossType(_aot, False),
    "aot_unpaired": _LossType(_aot_unpaired, False),
    "apo_zero": _LossType(_apo_zero, False),
    "apo_down": _LossType(_apo_down, False),
    "discopop": _LossType(_discopop, True),
    "sft": _LossType(None, True),
    "sigmoid_norm": _LossType(_sigmoid_norm, True),
}

DPO_LOSS_TYPES = tuple(_LOSS_TYPES)
F_DIVERGENCE_LOSS_TYPES = tuple(name for name, lt in _LOSS_TYPES.items() if lt.f_divergence)
RANK_MATCHED_LOSS_TYPES = ("aot", "aot_unpaired")


def f_divergence_scores(logratio: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """``f'(π/π_ref)`` written in the log-ratio ``u`` (see the module docstring), shape of ``u``."""
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(α−1) − 1) / (α − 1)
        if abs(alpha - 1.0) < 1e-6:  # the limit α → 1 is log t
            return logratio
        clamp_max = 11.0 if logratio.dtype == torch.float16 else 80.0  # exp stays finite after the cast back
        t = (alpha - 1.0) * logratio
        t = (t if t.dtype == torch.float64 else t.float()).clamp(max=clamp_max)
        return (torch.exp(t) - 1.0).to(logratio.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCES)}")


def wpo_weights(aligned_chosen_sum, chosen_count, aligned_rejected_sum, rejected_count) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", eq. 2, in TRL 1.16's form), ``(B,)``, no gradient::

        w = exp(mean_t a_t(y_w)) · exp(mean_t a_t(y_l)),   a_t = log π(y_t) − log Σ_v π(v)²

    The ``aligned_*_sum`` inputs are ``Σ_t a_t`` over each completion (the engine's
    ``*_aligned_sum``); means are over completion tokens (at least 1).
    """
    chosen = aligned_chosen_sum / chosen_count.clamp(min=1)
    rejected = aligned_rejected_sum / rejected_count.clamp(min=1)
    return torch.exp(chosen + rejected).detach()


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_count: torch.Tensor | None = None,
    rejected_count: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reward_shift: float = 0.0,
    partners: RankPartners | None = None,
) -> PreferenceLoss:
    """One DPO loss type (see the module docstring for every formula and paper).

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs, summed over completion tokens.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` reference log-probs, summed.
        beta: β (IPO's τ for ``ipo``).
        loss_type: one of :data:`DPO_LOSS_TYPES` except ``sft`` (the objective adds that one).
        label_smoothing: ε in ``[0, 0.5)``: ``sigmoid`` (cDPO), ``robust``, ``exo_pair`` (needs ε > 0), ``aot*``.
        chosen_count, rejected_count: ``(B,)`` completion token counts for ``ipo`` and
            ``sigmoid_norm`` (default 1: the summed log-ratios are compared as they are).
        f_divergence_type, f_alpha_divergence_coef: f-DPO's f and its α.
        discopop_tau: τ of ``discopop``.
        reward_shift: Δ of ``bco_pair`` (0 in TRL 1.16).
        partners: for ``aot``/``aot_unpaired``, the rank-matched partners taken over a larger set
            than this batch (:func:`rank_partners`); default: ranks within this batch, as TRL.

    Rewards: ``beta * c`` and ``beta * r`` (detached).
    """
    spec = _LOSS_TYPES.get(loss_type)
    if spec is None or spec.fn is None:
        choices = ", ".join(name for name, lt in _LOSS_TYPES.items() if lt.fn is not None)
        raise ValueError(f"unknown DPO loss_type {loss_type!r} for a per-pair loss; choose one of {choices}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if f_divergence_type != "reverse_kl" and not spec.f_divergence:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} does not apply to {loss_type!r}; use it with {', '.join(F_DIVERGENCE_LOSS_TYPES)}")
    chosen_logratio = chosen_logps - ref_chosen_logps
    rejected_logratio = rejected_logps - ref_rejected_logps
    ones = torch.ones_like(chosen_logratio)
    if partners is None and loss_type in RANK_MATCHED_LOSS_TYPES:
        partners = rank_partners(chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps, chosen_logratio, rejected_logratio)
    terms = DPOTerms(
        chosen_logratio=chosen_logratio,
        rejected_logratio=rejected_logratio,
        policy_margin=chosen_logps - rejected_logps,
        chosen_score=f_divergence_scores(chosen_logratio, f_divergence_type, f_alpha_divergence_coef),
        rejected_score=f_divergence_scores(rejected_logratio, f_divergence_type, f_alpha_divergence_coef),
        chosen_count=(chosen_count if chosen_count is not None else ones).clamp(min=1),
        rejected_count=(rejected_count if rejected_count is not None else ones).clamp(min=1),
        beta=beta,
        eps=label_smoothing,
        tau=discopop_tau,
        reward_shift=reward_shift,
        partners=partners,
    )
    return PreferenceLoss(
        losses=spec.fn(terms),
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
    )
