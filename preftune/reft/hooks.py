"""The :class:`~preftune.model_hooks.ModelHooks` of a model that carries ReFT interventions."""

from __future__ import annotations

import functools

from ..model_hooks import ModelHooks
from .generate import reft_generate
from .interventions import get_reft
from .io import save_interventions

__all__ = ["reft_hooks"]


def reft_hooks(model) -> ModelHooks | None:
    """Batch context, prefill-only generation and interventions-only saving for a ReFT model;
    None when ``model`` carries no interventions."""
    reft = get_reft(model)
    if reft is None:
        return None
    return ModelHooks(
        batch_context=reft.batch_context,
        generate=functools.partial(reft_generate, model),
        save_pretrained=functools.partial(save_interventions, reft),
    )
