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
from typing import Callable, Literal

from .errors import PreftuneError
from .losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from .objective import LossContext, MethodLoss, pair_metrics

__all__ = ["Hyperparameters", "MethodSpec", "METHODS", "get_method", "method_names"]


@dataclass(frozen=True)
class Hyperparameters:
    """The loss knobs of every method (a method reads the ones its declaration lists).

    Field names are the command-line flags (``--beta``, ``--loss_type``, ...); see
    :class:`preftune.config.PreftuneConfig` for their help.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    @classmethod
    def from_config(cls, config) -> Hyperparameters:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


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
        hyperparameters: the :class:`Hyperparameters` fields the loss reads (shown in the model card and report).
        metrics: the metric names it logs (besides ``loss`` and the trainer's own).
        loss_types: the ``--loss_type`` values it accepts (empty: none); the first is the default.
        validate: extra checks of a configuration using this method; raises :class:`PreftuneError`.
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


_REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_LOGP_METRICS = ("logps/chosen", "logps/rejected")


def _no_nll(hp: Hyperparameters) -> float:
    return 0.0


def _unit_nll(hp: Hyperparameters) -> float:
    return 1.0


# --- ORPO ---------------------------------------------------------------------------------------
def _orpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    out = orpo_loss(ctx.chosen, ctx.rejected, hp.beta)
    metrics = pair_metrics(ctx.chosen, ctx.rejected, out.chosen_rewards, out.rejected_rewards)
    b = float(ctx.chosen.shape[0])
    metrics["log_odds_ratio"] = (out.log_odds_ratio.sum().item(), b)
    metrics["log_odds_chosen"] = (out.log_odds.sum().item(), b)
    return MethodLoss(out.losses, metrics)


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
def _dpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    seq = ctx.seq
    chosen, rejected, ref_chosen, ref_rejected = ctx.chosen, ctx.rejected, ctx.ref_chosen, ctx.ref_rejected
    if hp.loss_type == "ipo":  # IPO compares length-averaged log-ratios (TRL's normalisation)
        chosen, rejected = chosen / seq.chosen_count, rejected / seq.rejected_count
        ref_chosen, ref_rejected = ref_chosen / seq.chosen_count, ref_rejected / seq.rejected_count
    out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, hp.beta, hp.loss_type, hp.label_smoothing)
    return MethodLoss(out.losses, pair_metrics(chosen, rejected, out.chosen_rewards, out.rejected_rewards))


DPO = MethodSpec(
    name="dpo",
    summary="DPO and its variants (--loss_type), against a frozen reference",
    loss=_dpo,
    logps="sum",
    needs_reference=True,
    nll_weight=_no_nll,
    hyperparameters=("beta", "loss_type", "label_smoothing"),
    metrics=("nll_loss", *_REWARD_METRICS, *_LOGP_METRICS),
    loss_types=DPO_LOSS_TYPES,
)


# --- SimPO and CPO --------------------------------------------------------------------------------
def _simpo(ctx: LossContext, hp: Hyperparameters) -> MethodLoss:
    out = simpo_loss(ctx.chosen, ctx.rejected, hp.beta, hp.simpo_gamma)
    return MethodLoss(out.losses, pair_metrics(ctx.chosen, ctx.rejected, out.chosen_rewards, out.rejected_rewards))


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
    out = cpo_loss(ctx.chosen, ctx.rejected, hp.beta)
    return MethodLoss(out.losses, pair_metrics(ctx.chosen, ctx.rejected, out.chosen_rewards, out.rejected_rewards))


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


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (ORPO, DPO, SIMPO, CPO, SFT)}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> MethodSpec:
    """The declaration of ``--method name``; a one-line error naming the choices otherwise."""
    spec = METHODS.get(name)
    if spec is None:
        raise PreftuneError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return spec
