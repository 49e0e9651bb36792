"""The training objective of each method, assembled from per-sequence statistics.

Reduction rule (what makes gradient accumulation and multi-process runs exact): a loss is
computed over a *window*, the micro-batches of one optimizer step on all processes. Each
micro-batch returns its share of the window loss::

    pref_share = sum_{i in micro-batch} loss_i / window_pairs
    nll_share  = sum_{i in micro-batch} nll_sum_i / window_nll_tokens

so the shares of a window add up to ``mean_i loss_i + (sum nll) / (nll tokens)``, exactly the
loss of one large batch holding the whole window. The NLL is a token mean over the window's
chosen sequences, as in the ORPO authors' code and TRL (``CrossEntropyLoss`` over the batch).

Per method (``lc``/``lr`` length-averaged, ``sc``/``sr`` summed completion log-probs):

=========  ==============================================================
orpo       ``NLL + beta * -log sigma(log_odds(lc, lr))``   (losses.orpo_loss)
dpo        ``dpo_loss(sc, sr, ref_sc, ref_sr)`` (IPO: averages)  (losses.dpo_loss)
simpo      ``-log sigma(beta (lc - lr) - gamma)``            (losses.simpo_loss)
cpo        ``-log sigma(beta (sc - sr)) + cpo_alpha * NLL``  (losses.cpo_loss)
sft        ``NLL``
=========  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import SequenceLogps
from .losses import PreferenceLoss, cpo_loss, dpo_loss, orpo_loss, simpo_loss

__all__ = ["Window", "ObjectiveResult", "compute_objective", "nll_weight", "METRIC_DOCS"]

# What each logged metric means; also rendered into docs/metrics.md.
METRIC_DOCS = {
    "loss": "the objective being minimised (mean over pairs of the window; see preftune.objective)",
    "nll_loss": "negative log-likelihood of the chosen sequences, token mean (completion tokens; plus prompt tokens with --nll_on_prompt)",
    "rewards/chosen": "ORPO/SimPO/CPO: beta * log-prob of the chosen completion (averaged per token for ORPO/SimPO, summed for CPO); DPO: beta * (policy - reference) summed log-prob",
    "rewards/rejected": "the same for the rejected completion",
    "rewards/accuracies": "fraction of pairs whose chosen reward exceeds the rejected reward",
    "rewards/margins": "mean of rewards/chosen - rewards/rejected",
    "logps/chosen": "mean per-token log-prob of chosen completions (ORPO/SimPO), or summed log-prob (DPO/CPO/SFT)",
    "logps/rejected": "the same for rejected completions",
    "log_odds_ratio": "ORPO: mean of log sigma(log odds ratio), the quantity whose negative is the odds-ratio loss",
    "log_odds_chosen": "ORPO: mean log odds ratio log(odds(chosen) / odds(rejected)); rises as the model prefers chosen",
    "aux_loss": "MoE router load-balancing loss (only when the model config sets output_router_logits)",
    "tokens_per_second": "real (non-padding) tokens fed to the model per second of training",
    "grad_norm": "gradient norm before clipping",
    "learning_rate": "current learning rate",
}


@dataclass
class Window:
    """Totals over the micro-batches of one optimizer step (summed over processes)."""

    pairs: float
    nll_tokens: float


@dataclass
class ObjectiveResult:
    loss: torch.Tensor  # this micro-batch's share of the window loss (scalar, differentiable)
    metric_sums: dict[str, float]  # metric name -> sum over this micro-batch's pairs
    nll_sum: float  # sum of chosen NLL over tokens (for the token-mean nll_loss metric)
    nll_tokens: float
    pairs: int
    pref_sum: float  # sum over pairs of the preference part of the loss (0 for sft)


def _uses_average(args) -> bool:
    """Length-averaged log-probs for ORPO, SimPO and DPO's IPO variant (as TRL); summed otherwise."""
    return args.method in ("orpo", "simpo") or (args.method == "dpo" and args.loss_type == "ipo")


def compute_objective(
    args,
    seq: SequenceLogps,
    window: Window,
    ref: tuple[torch.Tensor, torch.Tensor] | None = None,
    aux_coef: float = 0.0,
) -> ObjectiveResult:
    """Assemble the loss of ``args.method`` for one micro-batch; see the module docstring."""
    method = args.method
    average = _uses_average(args)
    chosen = seq.chosen_avg if average else seq.chosen_sum
    rejected = seq.rejected_avg if average else seq.rejected_sum
    nll_share = seq.nll_sum.sum() / window.nll_tokens
    pref: PreferenceLoss | None
    if method == "orpo":
        pref = orpo_loss(chosen, rejected, args.beta)
        loss = nll_weight(args) * nll_share + pref.losses.sum() / window.pairs
    elif method == "dpo":
        if ref is None:
            raise ValueError("DPO needs reference log-probs")
        ref_chosen, ref_rejected = ref
        if average:  # the reference returns sums; IPO compares length-averaged log-ratios
            ref_chosen, ref_rejected = ref_chosen / seq.chosen_count, ref_rejected / seq.rejected_count
        pref = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
        loss = pref.losses.sum() / window.pairs
    elif method == "simpo":
        pref = simpo_loss(chosen, rejected, args.beta, args.simpo_gamma)
        loss = pref.losses.sum() / window.pairs
    elif method == "cpo":
        pref = cpo_loss(chosen, rejected, args.beta)
        loss = pref.losses.sum() / window.pairs + nll_weight(args) * nll_share
    elif method == "sft":
        pref = None
        loss = nll_weight(args) * nll_share
    else:
        raise ValueError(f"unknown method {method!r}")

    b = int(chosen.shape[0])
    sums: dict[str, float] = {
        "logps/chosen": chosen.detach().sum().item(),
        "logps/rejected": rejected.detach().sum().item(),
    }
    if pref is not None:
        margins = pref.chosen_rewards - pref.rejected_rewards
        sums.update({
            "rewards/chosen": pref.chosen_rewards.sum().item(),
            "rewards/rejected": pref.rejected_rewards.sum().item(),
            "rewards/accuracies": (margins > 0).float().sum().item(),
            "rewards/margins": margins.sum().item(),
        })
        if pref.log_odds is not None:
            sums["log_odds_ratio"] = pref.log_odds_ratio.sum().item()
            sums["log_odds_chosen"] = pref.log_odds.sum().item()
    if seq.aux_loss is not None and aux_coef:
        # the aux loss is a mean over this micro-batch's tokens; weight it by the micro-batch's share of pairs
        loss = loss + aux_coef * seq.aux_loss * (b / window.pairs)
        sums["aux_loss"] = seq.aux_loss.detach().item() * b
    return ObjectiveResult(
        loss=loss,
        metric_sums=sums,
        nll_sum=seq.nll_sum.detach().sum().item(),
        nll_tokens=seq.nll_count.sum().item(),
        pairs=b,
        pref_sum=pref.losses.detach().sum().item() if pref is not None else 0.0,
    )


def nll_weight(args) -> float:
    """Weight of the token-mean chosen NLL in ``args.method``'s loss."""
    if args.method == "cpo":
        return float(args.cpo_alpha)
    return 1.0 if args.method in ("orpo", "sft") else 0.0
