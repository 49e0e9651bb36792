"""The method registry: one declaration per alignment method.

A :class:`MethodSpec` says everything the rest of preftune needs to know about a method: its
loss function (built from the pure functions in :mod:`preftune.losses`), whether it reads
length-averaged or summed log-probs, whether it needs a reference model, the weight of its NLL
term, the hyper-parameters it uses and the metrics it logs. The trainer, the command line, the
report and the model card read these declarations; nothing else in preftune switches on a
method's name. Adding a method is one declaration here, its loss function and its tests.

Formulas, papers and symbol mapping: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Literal, NamedTuple

import torch

from .engine import SequenceLogps
from .errors import PreftuneError
from .losses import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    KTO_LOSS_TYPES,
    RANK_MATCHED_LOSS_TYPES,
    class_weight_advice,
    cpo_loss,
    dpo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    rank_partners,
    simpo_loss,
    slic_loss,
    wpo_weights,
)

__all__ = ["Hyperparameters", "MethodSpec", "METHODS", "get_method", "find_method", "method_names", "data_unit_of", "LossContext", "MethodLoss", "pair_metrics"]


# --- what a method's loss reads and returns (preftune.objective calls it) -----------------------
class LossContext(NamedTuple):
    """What a method's loss function reads for one micro-batch of ``B`` pairs.

    ``chosen``/``rejected``: policy log-probs ``(B,)``, length-averaged or summed as the method
    declares (``MethodSpec.logps``); ``ref_chosen``/``ref_rejected`` the reference's, in the same
    form (None for reference-free methods). ``seq`` holds everything else the engine measured
    (token counts, summed log-probs, the NLL, WPO's aligned sums). ``desirable`` ``(B,)`` bool:
    the labels of unpaired examples. ``window_values``/``window_index``/``state``: see
    :class:`preftune.objective.Window` (the values are this micro-batch's own when it is the window).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    seq: SequenceLogps
    desirable: torch.Tensor | None = None
    window_values: dict[str, torch.Tensor] | None = None
    window_index: torch.Tensor | None = None
    state: dict[str, float] = {}


class MethodLoss(NamedTuple):
    """A method's loss on one micro-batch.

    ``losses``: per-pair preference loss ``(B,)`` (the objective sums it and divides by the
    window's pairs). ``nll_scale``: a factor on the method's NLL weight (1 unless the loss scales
    its NLL term). ``metrics``: ``name -> (sum, count)`` over this micro-batch.
    """

    losses: torch.Tensor | None
    metrics: dict[str, tuple[float, float]]
    nll_scale: float = 1.0


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, chosen_rewards=None, rejected_rewards=None) -> dict[str, tuple[float, float]]:
    """``logps/*`` and, given rewards, ``rewards/*`` sums over the ``B`` pairs (count ``B`` each)."""
    b = float(chosen.shape[0])
    out = {"logps/chosen": (chosen.detach().sum().item(), b), "logps/rejected": (rejected.detach().sum().item(), b)}
    if chosen_rewards is not None:
        margins = (chosen_rewards - rejected_rewards).detach()
        out.update({
            "rewards/chosen": (chosen_rewards.detach().sum().item(), b),
            "rewards/rejected": (rejected_rewards.detach().sum().item(), b),
            "rewards/accuracies": ((margins > 0).float().sum().item(), b),
            "rewards/margins": (margins.sum().item(), b),
        })
    return out



@dataclass(frozen=True)
class Hyperparameters:
    """The loss knobs of every method (a method reads the ones its declaration lists).

    Field names are the command-line flags (``--beta``, ``--loss_type``, ...); see
    :class:`preftune.config.PreftuneConfig` for their help. ``loss_type`` is the list of loss
    types (empty for methods without variants) and ``loss_weights`` their weights (None: all 1).
    """

    beta: float = 0.1
    loss_type: tuple[str, ...] = ()
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    ld_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False
    bco_running_mean: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def from_config(cls, config) -> Hyperparameters:
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        values["loss_type"] = tuple(values["loss_type"] or ())
        if values["loss_weights"] is not None:
            values["loss_weights"] = tuple(float(w) for w in values["loss_weights"])
        return cls(**values)

    def weighted_loss_types(self) -> list[tuple[str, float]]:
        """``(loss type, weight)`` pairs, weights 1 when none are given."""
        weights = self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)
        return list(zip(self.loss_type, weights))


@dataclass(frozen=True)
class MethodSpec:
    """One alignment method.

    Attributes:
        name: the ``--method`` value.
        summary: one line for ``preftune train --help`` and the docs.
        loss: ``loss(ctx, hp) -> MethodLoss`` for one micro-batch (see :mod:`preftune.objective`).
        logps: which policy log-probs ``loss`` reads: ``"average"`` (per completion token) or ``"sum"``.
        needs_reference: whether a frozen reference model's log-probs are passed in.
        nll_weight: weight of the window's token-mean chosen NLL in the loss, from the hyper-parameters.
        hyperparameters: the :class:`Hyperparameters` fields the loss reads (shown in the model card
            and report; setting another method's optional knob is an error).
        metrics: the metric names it logs (besides ``loss`` and the trainer's own).
        loss_types: the ``--loss_type`` values it accepts (empty: none); the first is the default.
        validate: extra checks of a configuration using this method; raises :class:`PreftuneError`.
        unpaired: trains on single completions labelled desirable/undesirable (``label``), not pairs.
        mismatched_completions: whether each unpaired example needs a KL completion (another
            example's completion after its prompt; see :mod:`preftune.data.unpaired`).
        window_values: ``(ctx, hp) -> {name: (B,)}``, the detached per-pair values the loss needs
            over the whole optimizer step (see :mod:`preftune.objective`).
        needs_window: whether, with these hyper-parameters, ``window_values`` returns anything.
        advance_state: ``(state, window values, hp) -> state``, once per optimizer step, for
            losses with running statistics (saved in checkpoints).
        derived_metrics: ``means -> extra metrics`` computed from the logged means (e.g. KTO's margin).
        data_warnings: ``(train pairs, hp) -> messages`` to log about the training data (e.g. KTO's class balance).
    """

    name: str
    summary: str
    loss: Callable[[LossContext, Hyperparameters], MethodLoss]
    logps: Literal["average", "sum"]
    needs_reference: bool
    nll_weight: Callable[[Hyperparameters], float]
    hyperparameters: tuple[str, ...]
    metrics: tuple[str, ...]
    loss_types: tuple[str, ...] = ()
    validate: Callable[[object], None] | None = None
    unpaired: bool = False
    mismatched_completions: Callable[[Hyperparameters], bool] = lambda hp: False
    window_values: Callable[[LossContext, Hyperparameters], dict[str, torch.Tensor]] | None = None
    needs_window: Callable[[Hyperparameters], bool] = lambda hp: False
    advance_state: Callable[[dict, dict, Hyperparameters], dict] | None = None
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    data_warnings: Callable[[list, Hyperparameters], list[str]] | None = None

    @property
    def data_unit(self) -> str:
        """What one training item is called in messages, the model card and the report."""
        return "examples" if self.unpaired else "pairs"


_REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_LOGP_METRICS = ("logps/chosen", "logps/rejected")


def _with_pair_metrics(ctx: LossContext, out) -> MethodLoss:
    """A paired loss's result with the usual logps/* and rewards/* metrics."""
    return MethodLoss(out.losses, pair_metrics(ctx.chosen, ctx.rejected, out.chosen_rewards, out.rejected_rewards))


def _no_nll(hp: Hyperparameters) -> float:
    return 0.0


def _unit_nll(hp: Hyperparameters) -> float:
    return 1.0


# --- ORPO ---------------------------------------------------------------------------------------
def _orpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    out = orpo_loss(ctx.chosen, ctx.rejected, hp.beta)
    result = _with_pair_metrics(ctx, out)
    b = float(ctx.chosen.shape[0])
    result.metrics["log_odds_ratio"] = (out.log_odds_ratio.sum().item(), b)
    result.metrics["log_odds_chosen"] = (out.log_odds.sum().item(), b)
    return result


ORPO = MethodSpec(
    name="orpo",
    summary="ORPO (default): NLL + beta * odds-ratio term, no reference model",
    loss=_orpo,
    logps="average",
    needs_reference=False,
    nll_weight=_unit_nll,
    hyperparameters=("beta",),
    metrics=("nll_loss", *_REWARD_METRICS, *_LOGP_METRICS, "log_odds_ratio", "log_odds_chosen"),
)


# --- DPO ----------------------------------------------------------------------------------------
def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PreftuneError(message)


def _dpo_needs_window(hp: Hyperparameters) -> bool:
    types = set(hp.loss_type)
    return bool(types & set(RANK_MATCHED_LOSS_TYPES)) or ("sft" in types and hp.use_weighting) or ("bco_pair" in types and hp.bco_running_mean)


def _dpo_window_values(ctx: LossContext, hp: Hyperparameters) -> dict[str, torch.Tensor]:
    types = set(hp.loss_type)
    out: dict[str, torch.Tensor] = {}
    if types & set(RANK_MATCHED_LOSS_TYPES):  # aot*: ranks over the whole window
        out.update(
            policy_margin=ctx.chosen - ctx.rejected,
            ref_margin=ctx.ref_chosen - ctx.ref_rejected,
            chosen_logratio=ctx.chosen - ctx.ref_chosen,
            rejected_logratio=ctx.rejected - ctx.ref_rejected,
        )
    if "sft" in types and hp.use_weighting:  # the sft term is weighted by the window's mean WPO weight
        out["wpo_weight"] = _wpo(ctx)
    if "bco_pair" in types and hp.bco_running_mean:  # mean of the chosen and rejected rewards
        out["reward"] = hp.beta * ((ctx.chosen - ctx.ref_chosen) + (ctx.rejected - ctx.ref_rejected)) / 2
    return out


def _advance_bco(state: dict, values: dict, hp: Hyperparameters) -> dict:
    """BCO's reward shift: the running mean over optimizer steps of each step's mean reward."""
    if "reward" not in values:
        return state
    steps = state.get("bco_steps", 0) + 1
    shift = state.get("bco_reward_shift", 0.0)
    shift += (values["reward"].double().mean().item() - shift) / steps
    return {**state, "bco_steps": steps, "bco_reward_shift": shift}


def _wpo(ctx: LossContext) -> torch.Tensor:
    seq = ctx.seq
    return wpo_weights(seq.chosen_aligned_sum, seq.chosen_count, seq.rejected_aligned_sum, seq.rejected_count)


def _dpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    """TRL 1.16's DPO: a weighted sum of loss types over summed (LD-weighted) log-probs."""
    seq = ctx.seq
    weights = _wpo(ctx) if hp.use_weighting else None
    partners = None
    if set(hp.loss_type) & set(RANK_MATCHED_LOSS_TYPES):
        v = ctx.window_values
        partners = rank_partners(v["policy_margin"], v["ref_margin"], v["chosen_logratio"], v["rejected_logratio"], ctx.window_index)
    losses, nll_scale = None, 1.0
    out = None
    for loss_type, weight in hp.weighted_loss_types():
        if loss_type == "sft":  # the NLL term (weight in nll_weight); WPO scales it by the mean pair weight
            if weights is not None:
                nll_scale = ctx.window_values["wpo_weight"].mean().item()
            continue
        out = dpo_loss(
            ctx.chosen, ctx.rejected, ctx.ref_chosen, ctx.ref_rejected, hp.beta, loss_type, hp.label_smoothing,
            chosen_count=seq.chosen_count, rejected_count=seq.rejected_count,
            f_divergence_type=hp.f_divergence_type, f_alpha_divergence_coef=hp.f_alpha_divergence_coef,
            discopop_tau=hp.discopop_tau, reward_shift=ctx.state.get("bco_reward_shift", 0.0), partners=partners,
        )
        term = weight * (out.losses * weights if weights is not None else out.losses)
        losses = term if losses is None else losses + term
    chosen_rewards = (hp.beta * (ctx.chosen - ctx.ref_chosen)).detach()
    rejected_rewards = (hp.beta * (ctx.rejected - ctx.ref_rejected)).detach()
    return MethodLoss(losses, pair_metrics(ctx.chosen, ctx.rejected, chosen_rewards, rejected_rewards), nll_scale)


def _validate_dpo(config) -> None:
    types, weights = config.loss_type, config.loss_weights
    _require(len(set(types)) == len(types), f"--loss_type lists a loss type twice ({' '.join(types)}); give each once, with its weight in --loss_weights")
    if weights is not None:
        _require(len(weights) == len(types), f"--loss_weights needs one weight per --loss_type: got {len(weights)} weights for {len(types)} loss types ({' '.join(types)})")
    if config.f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        _require(not bad, f"--f_divergence_type {config.f_divergence_type} has no form for --loss_type {' '.join(bad)} (it applies to "
                 f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}); use the default reverse_kl with these loss types")
    if config.use_weighting:
        bad = [t for t in types if t in RANK_MATCHED_LOSS_TYPES]
        _require(not bad, f"--use_weighting (WPO) does not work with --loss_type {' '.join(bad)}: they match pairs by rank, which would misalign the pair weights")
    _require("exo_pair" not in types or config.label_smoothing > 0, "--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper recommends 1e-3)")
    _require(not config.bco_running_mean or "bco_pair" in types, "--bco_running_mean applies to --loss_type bco_pair only")


DPO = MethodSpec(
    name="dpo",
    summary="DPO and its variants (--loss_type, several at once with --loss_weights), against a frozen reference",
    loss=_dpo,
    logps="sum",
    needs_reference=True,
    nll_weight=lambda hp: sum(w for t, w in hp.weighted_loss_types() if t == "sft"),
    hyperparameters=("beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef",
                     "discopop_tau", "use_weighting", "bco_running_mean"),
    metrics=("nll_loss", *_REWARD_METRICS, *_LOGP_METRICS),
    loss_types=DPO_LOSS_TYPES,
    validate=_validate_dpo,
    window_values=_dpo_window_values,
    needs_window=_dpo_needs_window,
    advance_state=_advance_bco,
)


# --- SimPO and CPO --------------------------------------------------------------------------------
def _simpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    return _with_pair_metrics(ctx, simpo_loss(ctx.chosen, ctx.rejected, hp.beta, hp.simpo_gamma))


SIMPO = MethodSpec(
    name="simpo",
    summary="SimPO: reference-free, length-normalised, target margin gamma",
    loss=_simpo,
    logps="average",
    needs_reference=False,
    nll_weight=_no_nll,
    hyperparameters=("beta", "simpo_gamma"),
    metrics=("nll_loss", *_REWARD_METRICS, *_LOGP_METRICS),
)


def _cpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    return _with_pair_metrics(ctx, cpo_loss(ctx.chosen, ctx.rejected, hp.beta))


CPO = MethodSpec(
    name="cpo",
    summary="CPO: reference-free sigmoid loss on summed log-probs + cpo_alpha * NLL",
    loss=_cpo,
    logps="sum",
    needs_reference=False,
    nll_weight=lambda hp: float(hp.cpo_alpha),
    hyperparameters=("beta", "cpo_alpha"),
    metrics=("nll_loss", *_REWARD_METRICS, *_LOGP_METRICS),
)


def _slic(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    return _with_pair_metrics(ctx, slic_loss(ctx.chosen, ctx.rejected, hp.beta))


SLIC = MethodSpec(
    name="slic",
    summary="SLiC-HF: reference-free hinge (margin 1/beta) on summed log-probs + cpo_alpha * NLL",
    loss=_slic,
    logps="sum",
    needs_reference=False,
    nll_weight=lambda hp: float(hp.cpo_alpha),
    hyperparameters=("beta", "cpo_alpha"),
    metrics=("nll_loss", *_REWARD_METRICS, *_LOGP_METRICS),
)


# --- SFT ----------------------------------------------------------------------------------------
def _sft(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    return MethodLoss(None, pair_metrics(ctx.chosen, ctx.rejected))


SFT = MethodSpec(
    name="sft",
    summary="SFT: NLL of the chosen completions",
    loss=_sft,
    logps="sum",
    needs_reference=False,
    nll_weight=_unit_nll,
    hyperparameters=(),
    metrics=("nll_loss", *_LOGP_METRICS),
)


# --- KTO ----------------------------------------------------------------------------------------
def _kto_uses_kl(hp: Hyperparameters) -> bool:
    return hp.loss_type == ("kto",)


def _kto_window_values(ctx: LossContext, hp: Hyperparameters) -> dict[str, torch.Tensor]:
    # "rejected" holds each example's KL completion: its policy-minus-reference log-ratio
    return {"kl_logratio": ctx.rejected - ctx.ref_rejected} if _kto_uses_kl(hp) else {}


def _kto(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    kl = kl_estimate(ctx.window_values["kl_logratio"]) if _kto_uses_kl(hp) else torch.zeros((), device=ctx.chosen.device)
    out = kto_loss(ctx.chosen, ctx.ref_chosen, ctx.desirable, kl, hp.beta, hp.loss_type[0], hp.desirable_weight, hp.undesirable_weight)
    good = ctx.desirable.bool()
    n_good, n_bad = float(good.sum()), float((~good).sum())
    logps = ctx.chosen.detach()
    metrics = {
        "rewards/chosen": (out.rewards[good].sum().item(), n_good),
        "rewards/rejected": (out.rewards[~good].sum().item(), n_bad),
        "logps/chosen": (logps[good].sum().item(), n_good),
        "logps/rejected": (logps[~good].sum().item(), n_bad),
    }
    if _kto_uses_kl(hp):
        metrics["kl"] = (kl.item() * len(good), float(len(good)))
    return MethodLoss(out.losses, metrics)


def _kto_margins(means: dict[str, float]) -> dict[str, float]:
    if "rewards/chosen" in means and "rewards/rejected" in means:
        return {"rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}
    return {}


def _kto_data_warnings(pairs: list, hp: Hyperparameters) -> list[str]:
    desirable = sum(1 for p in pairs if p.label)
    advice = class_weight_advice(desirable, len(pairs), hp.desirable_weight, hp.undesirable_weight)
    return [advice] if advice else []


def _validate_kto(config) -> None:
    _require(len(config.loss_type) == 1, f"--method kto takes one --loss_type ({' or '.join(KTO_LOSS_TYPES)}), got {' '.join(config.loss_type)}")
    if config.loss_type == ["kto"]:
        _require(config.per_device_train_batch_size >= 2, "--method kto needs --per_device_train_batch_size of at least 2: its KL term pairs each "
                 "example's prompt with another example's completion from the same batch (or use --loss_type apo_zero_unpaired)")
        _require(config.max_tokens_per_batch is None, "--max_tokens_per_batch does not work with --method kto --loss_type kto: KL completions are "
                 "drawn from fixed batches of --per_device_train_batch_size examples; drop it")


KTO = MethodSpec(
    name="kto",
    summary="KTO: unpaired desirable/undesirable completions (rows prompt, completion, label; pairs are split), against a frozen reference",
    loss=_kto,
    logps="sum",
    needs_reference=True,
    nll_weight=_no_nll,
    hyperparameters=("beta", "loss_type", "desirable_weight", "undesirable_weight"),
    metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", *_LOGP_METRICS, "kl"),
    loss_types=KTO_LOSS_TYPES,
    validate=_validate_kto,
    unpaired=True,
    mismatched_completions=_kto_uses_kl,
    window_values=_kto_window_values,
    needs_window=_kto_uses_kl,
    derived_metrics=_kto_margins,
    data_warnings=_kto_data_warnings,
)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (ORPO, DPO, SIMPO, CPO, SLIC, SFT, KTO)}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def find_method(name) -> MethodSpec | None:
    """The declaration called ``name``, or None (a missing or unknown name, e.g. read from an old run's files)."""
    return METHODS.get(name) if isinstance(name, str) else None


def data_unit_of(name) -> str:
    """``data_unit`` of the method called ``name`` ("pairs" for an unknown or missing one: old runs)."""
    spec = find_method(name)
    return spec.data_unit if spec is not None else "pairs"


def get_method(name: str) -> MethodSpec:
    """The declaration of ``--method name``; a one-line error naming the choices otherwise."""
    spec = find_method(name)
    if spec is None:
        raise PreftuneError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return spec
