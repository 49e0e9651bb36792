"""Preference losses as pure functions of per-sequence log-probabilities.

Every function here takes tensors of shape ``(B,)`` (one value per preference pair, or per
example for the unpaired KTO) and returns a small named result whose ``losses`` field is the
per-pair loss ``(B,)``: ``orpo`` (ORPO), ``dpo`` (DPO and TRL's fifteen loss types, f-DPO, WPO
weights), ``reference_free`` (SimPO, CPO, SLiC), ``kto`` (KTO, unpaired APO-zero). Reduction over the
batch (and over gradient-accumulation windows) is :mod:`preftune.objective`'s job, so that accumulating ``k``
micro-batches gives exactly the update of one ``k``-times larger batch.

Notation used throughout (ORPO paper, Hong et al. 2024, arXiv:2403.07691):

* ``x`` prompt, ``y_w`` chosen ("winning") completion, ``y_l`` rejected ("losing") completion;
* ``lc = (1/|y_w|) sum_t log P(y_w,t | x, y_w,<t)``: length-averaged log-prob of the chosen
  completion (the engine's ``chosen_avg``; a method whose declaration reads ``logps="average"``
  gets it); ``lr`` likewise for the rejected completion;
* ``sigma`` is the logistic function.

No function here touches a model, tokenizer or config.
"""

from __future__ import annotations

from .base import PreferenceLoss, log1mexp
from .dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    RANK_MATCHED_LOSS_TYPES,
    RankPartners,
    dpo_loss,
    f_divergence_scores,
    rank_partners,
    wpo_weights,
)
from .kto import KTO_LOSS_TYPES, KTOLoss, class_weight_advice, kl_estimate, kto_loss
from .orpo import orpo_loss
from .reference_free import cpo_loss, simpo_loss, slic_loss

__all__ = [
    "PreferenceLoss", "log1mexp", "orpo_loss", "dpo_loss", "simpo_loss", "cpo_loss", "slic_loss", "kto_loss", "kl_estimate", "KTOLoss", "class_weight_advice",
    "f_divergence_scores", "wpo_weights", "rank_partners", "RankPartners",
    "DPO_LOSS_TYPES", "F_DIVERGENCES", "F_DIVERGENCE_LOSS_TYPES", "RANK_MATCHED_LOSS_TYPES", "KTO_LOSS_TYPES",
]
