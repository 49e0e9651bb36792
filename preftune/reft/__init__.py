"""Native LoReFT: low-rank representation interventions at chosen layers and prompt positions.

LoReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models", eq. 2) edits
the hidden state ``h`` (the block output of a decoder layer, the residual stream) at a few
token positions instead of updating weights::

    phi(h) = h + R^T (W h + b - R h)

    h   (H,)     block output of layer l at one intervened position (H = hidden size)
    R   (r, H)   projection with orthonormal rows (R R^T = I_r): the r-dim subspace edited
    W   (r, H)   learned linear source, b (r,) its bias (the paper's "learned projected source")
    r            rank (``--reft_rank``; the paper's and pyreft's ``low_rank_dimension``)

In the subspace spanned by R the representation is replaced by ``W h + b``; outside it ``h``
is untouched. R is kept orthonormal during training by ``torch.nn.utils.parametrizations
.orthogonal`` (as pyreft does). Unlike pyreft, ``W`` starts equal to ``R`` and ``b`` at 0, so an
untrained intervention is the identity and training starts from the base model exactly (as
LoRA's zero-initialised B does); a DPO reference copied from the starting policy is then the
base model.

Where (pyreft's ``--reft_positions`` syntax): ``fK`` = the first K prompt tokens, ``lK`` = the
last K prompt tokens, joined with ``+`` (``f1+l1``, ``f3``, ``l2``, ``f5+l5``). Prompt tokens
only, never completion tokens. With ``--reft_share_weights`` one intervention per layer acts on
the union of the first and last positions (pyreft's ``share_weights=True``); without it the
first and last positions get one intervention each (applied first-then-last where a short
prompt makes them overlap). Prompts shorter than K use all their tokens.

How the positions reach the layers: every intervened decoder layer carries a forward hook.
The hooks act only inside :meth:`ReftInterventions.at_prompts`, a context that resolves the
positions of every prompt occurrence of the current batch, given as ``prompt_spans`` rows
``(row, start, length)``, into flat indices of the ``(R * T)`` hidden states. The engine
enters it through the ``batch_context`` of the model's :class:`preftune.model_hooks.ModelHooks`
(:func:`reft_hooks`), which the engine receives as an argument, for both batch layouts: the packed layout holds each
prompt once, the padded layout twice (chosen and rejected rows), and both give the same
log-probs. Outside the context the model is the plain base model. For generation,
:func:`reft_generate` enters it for the prefill forward only, so the prompt positions are
intervened on and generated tokens are not (pyreft's ``intervene_on_prompt=True``).

In transformers 5, gradient checkpointing wraps a layer's ``forward`` and forward hooks run
after it, outside the recomputed region (pinned by ``tests/test_reft.py``).

Saved files (``output_dir``): ``reft_interventions.safetensors`` (``layer{l}_{group}.R``,
``.W``, ``.b`` per intervention, R materialised) and ``reft_config.json`` (layers, rank,
positions, share_weights, hidden size, base model). :func:`load_reft` puts them back on a base
model; the reloaded model gives bit-identical outputs.

The package: :mod:`.spec` (torch-free: the syntax and the saved config, what
:mod:`preftune.config` validates flags against), :mod:`.interventions` (the modules and attaching
them to a model), :mod:`.io` (save and load), :mod:`.generate` (prefill-only generation) and
:mod:`.hooks` (the :class:`~preftune.model_hooks.ModelHooks` of a ReFT model).
"""

# Exports load on first use (PEP 562): importing preftune.reft.spec (what config validation
# needs) must not import torch and the model code.
_EXPORTS = {
    "ReftConfig": "spec", "parse_positions": "spec", "parse_layers": "spec",
    "LoReFT": "interventions", "ReftInterventions": "interventions", "attach_reft": "interventions",
    "add_interventions": "interventions", "get_reft": "interventions", "disable_reft": "interventions",
    "save_reft": "io", "load_reft": "io", "reft_generate": "generate", "generate_with_reft": "generate",
    "reft_hooks": "hooks",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'preftune.reft' has no attribute {name!r}")
