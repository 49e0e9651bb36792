"""Generation with ReFT interventions: they act on the prompt during prefill only."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PreftuneError
from .interventions import get_reft

__all__ = ["reft_generate", "generate_with_reft"]


def reft_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
    """``model.generate`` with the interventions applied to the prompt positions during prefill.

    ``input_ids`` ``(B, T)``: prompts, left-padded when ``B > 1`` (give ``attention_mask``).
    Generated tokens are not intervened on. Needs the KV cache (the default). Returns what
    ``generate`` returns (prompt + new tokens).
    """
    reft = get_reft(model)
    if reft is None:
        raise PreftuneError("reft_generate: this model carries no ReFT interventions (load them with load_reft)")
    if generate_kwargs.get("use_cache") is False:
        raise PreftuneError("reft_generate needs use_cache=True: the interventions act on the prompt during prefill only")
    # Explicitly: a model saved by a training run has use_cache=False in its config (the Trainer
    # sets it), and without the cache every step would recompute the prompt without interventions.
    generate_kwargs["use_cache"] = True
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows, seq_len = input_ids.shape
    lengths = attention_mask.sum(1)  # (B,)
    starts = seq_len - lengths
    real = torch.arange(seq_len, device=input_ids.device)[None] >= starts[:, None]
    if not torch.equal(real, attention_mask.bool()):
        raise PreftuneError("reft_generate: pad batched prompts on the left (tokenizer.padding_side = 'left')")
    gen_config = getattr(model, "generation_config", None)
    expand = int(generate_kwargs.get("num_beams", getattr(gen_config, "num_beams", 1)) or 1)
    expand *= int(generate_kwargs.get("num_return_sequences", getattr(gen_config, "num_return_sequences", 1)) or 1)
    spans = torch.stack([torch.arange(rows * expand, device=input_ids.device), starts.repeat_interleave(expand), lengths.repeat_interleave(expand)], 1)
    with reft.at_prompts(spans, rows * expand, seq_len, once=True):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)


def generate_with_reft(model: nn.Module, tokenizer, prompt, max_new_tokens: int = 128, **generate_kwargs) -> str:
    """Generate a reply to one prompt and return the new text.

    ``prompt``: a string (tokenized with the tokenizer's special tokens, BOS included, unless the
    string already starts with BOS, as a rendered chat template does) or a list of chat messages
    (rendered with the tokenizer's chat template and a generation prompt).
    """
    if isinstance(prompt, (list, tuple)):
        prompt = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)), return_tensors="pt").input_ids
    ids = ids.to(next(model.parameters()).device)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = reft_generate(model, ids, max_new_tokens=max_new_tokens, **generate_kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
