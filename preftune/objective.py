"""From a method's declaration and one micro-batch's log-probs to the loss and its metrics.

A method (:mod:`preftune.methods`) declares a loss function ``loss(ctx, hp) -> MethodLoss``: the
per-example preference losses ``(B,)`` and the weight of the NLL term. This module reduces them
so that gradient accumulation and multi-process runs are exact.

Reduction rule: a loss is computed over a *window*, the micro-batches of one optimizer step on
all processes. Each micro-batch returns its share of the window loss::

    pref_share = sum_{i in micro-batch} loss_i / window_pairs
    nll_share  = sum_{i in micro-batch} nll_sum_i / window_nll_tokens
    loss_share = pref_share + nll_weight * nll_share (+ aux_coef * aux * B / window_pairs)

so the shares of a window add up to ``mean_i loss_i + nll_weight * (sum nll) / (nll tokens)``,
exactly the loss of one large batch holding the whole window. The NLL is a token mean over the
window's chosen sequences, as in the ORPO authors' code and TRL (``CrossEntropyLoss`` over the
batch). "Pairs" are preference pairs, or unpaired examples for unpaired methods.

Window-wide values. A few losses need a detached quantity over the whole window, not just the
micro-batch: KTO's KL estimate (a mean over every example), the rank matching of ``aot`` (sorted
over every pair), WPO's mean weight for an ``sft`` term, BCO's reward shift. A method declares
them (``MethodSpec.window_values``): per-pair values ``(B,)`` that the trainer gathers over the
window (in the same forward when each process holds one micro-batch, else with one no-grad pass
before the window) into :attr:`Window.values`; :attr:`Window.index` tells each micro-batch where
its pairs are. Without them (evaluation, a direct call) the micro-batch is its own window, which
is TRL's per-batch behaviour.

Metrics are returned as ``name -> (sum, count)`` over the micro-batch, so the trainer can report
exact means over any number of micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from .engine import SequenceLogps
from .methods import Hyperparameters, LossContext, MethodSpec

__all__ = ["Window", "ObjectiveResult", "compute_objective", "window_values", "METRIC_DOCS"]

# What each logged metric means; docs/metrics.md explains each (a test checks every key is there).
METRIC_DOCS = {
    "loss": "the objective being minimised (mean over pairs of the window; see preftune.objective)",
    "nll_loss": "negative log-likelihood of the chosen sequences, token mean (completion tokens; plus prompt tokens with --nll_on_prompt)",
    "rewards/chosen": "ORPO/SimPO/CPO: beta * log-prob of the chosen completion (averaged per token for ORPO/SimPO, summed for CPO); DPO: beta * (policy - reference) summed log-prob; KTO: the same over desirable examples",
    "rewards/rejected": "the same for the rejected completion (KTO: over undesirable examples)",
    "rewards/accuracies": "fraction of pairs whose chosen reward exceeds the rejected reward",
    "rewards/margins": "mean of rewards/chosen - rewards/rejected (KTO: difference of the two means)",
    "logps/chosen": "mean per-token log-prob of chosen completions (ORPO/SimPO), or summed log-prob (DPO/CPO/SFT; KTO: desirable completions)",
    "logps/rejected": "the same for rejected completions (KTO: undesirable completions)",
    "kl": "KTO: the KL estimate z = max(0, mean log-ratio of the mismatched KL completions), over each optimizer step's examples",
    "log_odds_ratio": "ORPO: mean of log sigma(log odds ratio), the quantity whose negative is the odds-ratio loss",
    "log_odds_chosen": "ORPO: mean log odds ratio log(odds(chosen) / odds(rejected)); rises as the model prefers chosen",
    "aux_loss": "MoE router load-balancing loss (only when the model config sets output_router_logits)",
    "tokens_per_second": "real (non-padding) tokens fed to the model per second of training",
    "grad_norm": "gradient norm before clipping",
    "learning_rate": "current learning rate",
}


@dataclass
class Window:
    """Totals over the micro-batches of one optimizer step (summed over processes).

    ``pairs`` and ``nll_tokens`` are divided by the number of processes when DDP averages
    gradients (each process's share is then scaled up by that number). ``values``: the method's
    window-wide values ``name -> (N,)`` over all ``N`` pairs of the window (None: this micro-batch
    is the window); ``index`` ``(B,)``: where this micro-batch's pairs are in them. ``state``: the
    method's running state (e.g. BCO's reward shift), already advanced by this window.
    """

    pairs: float
    nll_tokens: float
    values: dict[str, torch.Tensor] | None = None
    index: torch.Tensor | None = None
    state: dict[str, float] = field(default_factory=dict)


@dataclass
class ObjectiveResult:
    loss: torch.Tensor  # this micro-batch's share of the window loss (scalar, differentiable)
    metric_sums: dict[str, tuple[float, float]]  # metric name -> (sum, count) over this micro-batch
    nll_sum: float  # sum of chosen NLL over tokens (for the token-mean nll_loss metric)
    nll_tokens: float
    pairs: int


def _context(method: MethodSpec, seq: SequenceLogps, ref, desirable) -> LossContext:
    if method.needs_reference and ref is None:
        raise ValueError(f"{method.name} needs reference log-probs")
    if method.unpaired and desirable is None:
        raise ValueError(f"{method.name} needs the examples' labels (desirable)")
    average = method.logps == "average"
    chosen = seq.chosen_avg if average else seq.chosen_sum
    rejected = seq.rejected_avg if average else seq.rejected_sum
    ref_chosen = ref_rejected = None
    if ref is not None:
        ref_chosen, ref_rejected = ref
        if average:
            ref_chosen, ref_rejected = ref_chosen / seq.chosen_count, ref_rejected / seq.rejected_count
    return LossContext(chosen, rejected, ref_chosen, ref_rejected, seq, desirable)


def window_values(method: MethodSpec, hp: Hyperparameters, seq: SequenceLogps, ref=None, desirable=None) -> dict[str, torch.Tensor]:
    """This micro-batch's contribution to the method's window-wide values (``name -> (B,)``,
    detached; empty when the method needs none with these hyper-parameters)."""
    if method.window_values is None or not method.needs_window(hp):
        return {}
    values = method.window_values(_context(method, seq, ref, desirable), hp)
    return {k: v.detach() for k, v in values.items()}


def compute_objective(
    method: MethodSpec,
    hp: Hyperparameters,
    seq: SequenceLogps,
    window: Window,
    ref: tuple[torch.Tensor, torch.Tensor] | None = None,
    aux_coef: float = 0.0,
    desirable: torch.Tensor | None = None,
) -> ObjectiveResult:
    """``method``'s loss share for one micro-batch (see the module docstring).

    ``ref``: the reference's **summed** completion log-probs ``(chosen, rejected)``, each ``(B,)``,
    for methods that need a reference; averaged here by the completion lengths when the method
    reads averaged log-probs. ``desirable``: ``(B,)`` labels of unpaired examples.
    """
    ctx = _context(method, seq, ref, desirable)
    b = int(ctx.chosen.shape[0])
    if window.values is not None:
        ctx = ctx._replace(window_values=window.values, window_index=window.index, state=window.state)
    else:  # this micro-batch is the window
        local = window_values(method, hp, seq, ref, desirable)
        index = torch.arange(b, device=ctx.chosen.device)
        ctx = ctx._replace(window_values=local, window_index=index, state=window.state)
    terms = method.loss(ctx, hp)
    chosen = ctx.chosen
    loss = chosen.new_zeros(())
    if terms.losses is not None:
        loss = loss + terms.losses.sum() / window.pairs
    nll_weight = method.nll_weight(hp) * terms.nll_scale
    if nll_weight:
        loss = loss + nll_weight * seq.nll_sum.sum() / window.nll_tokens
    sums = dict(terms.metrics)
    if seq.aux_loss is not None and aux_coef:
        # the aux loss is a mean over this micro-batch's tokens; weight it by the micro-batch's share of pairs
        loss = loss + aux_coef * seq.aux_loss * (b / window.pairs)
        sums["aux_loss"] = (seq.aux_loss.detach().item() * b, float(b))
    return ObjectiveResult(
        loss=loss,
        metric_sums=sums,
        nll_sum=seq.nll_sum.detach().sum().item(),
        nll_tokens=seq.nll_count.sum().item(),
        pairs=b,
    )
