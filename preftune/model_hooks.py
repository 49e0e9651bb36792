"""What a model with extra parts needs done around it, handed explicitly to whoever runs it.

A plain causal LM needs nothing: the engine calls its decoder, ``generate`` generates, the Trainer
saves it. A model carrying ReFT interventions needs three things done around it: the prompt
positions of each batch set before a forward (the interventions act there), generation that
intervenes on the prompt during prefill only, and saving only the interventions. Rather than
hanging callables on the model object for other modules to discover, these travel as a
:class:`ModelHooks` value: the engine takes ``batch_context`` as an argument, the trainer takes
``hooks``, and a loaded model (:class:`preftune.inference_model.LoadedModel`) carries them beside the
model. Today only ReFT produces hooks (:func:`preftune.reft.reft_hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager

__all__ = ["ModelHooks", "NO_HOOKS"]


@dataclass(frozen=True)
class ModelHooks:
    """Callables that run a model with extra parts correctly; each None means "nothing special".

    * ``batch_context(batch) -> context manager``: entered around the engine's forward over a
      collated ``batch`` (ReFT: resolves ``batch["prompt_spans"]`` into the positions to edit).
    * ``generate(input_ids, **generate_kwargs) -> ids``: generation instead of ``model.generate``
      (ReFT: the interventions act on the prompt during prefill).
    * ``save_pretrained(folder)``: writes only the trained parts instead of the whole model (ReFT:
      ``reft_interventions.safetensors`` + ``reft_config.json``); Trainer checkpoints still hold
      the full state so resuming works.
    """

    batch_context: Callable[[dict], ContextManager[Any]] | None = None
    generate: Callable[..., Any] | None = None
    save_pretrained: Callable[[str], None] | None = None


NO_HOOKS = ModelHooks()

