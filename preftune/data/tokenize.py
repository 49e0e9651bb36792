"""Rendering and tokenizing preference examples with an exact prompt/completion boundary.

Rendering (text):
    conversational examples go through the tokenizer's chat template (``prompt`` with
    ``add_generation_prompt=True``; the completion is the suffix the template adds for the
    assistant turn). String examples are used as they are, unless ``chat_template="always"`` or
    the row has a ``system`` field and the tokenizer has a chat template (truthy-dpo style, as
    the seeds do by hand), in which case the prompt becomes ``[system, user]`` messages.
    A tokenizer without a chat template gets :data:`DEFAULT_CHAT_TEMPLATE` (ChatML), said once
    in the log.

Tokenizing (ids), the boundary rule:
    ``P = enc(prompt)``, ``Fc = enc(prompt + chosen)``, ``Fr = enc(prompt + rejected)``.
    Let ``k`` be the longest common prefix of ``P``, ``Fc`` and ``Fr``. The pair is
    ``prompt = P[:k]``, ``chosen = Fc[k:] + [eos]``, ``rejected = Fr[k:] + [eos]``. So the
    prompt tokens are always a prefix of the tokenization of the full text; when a tokenizer
    merges across the boundary (SentencePiece ``"A: "`` + ``"Hi"`` -> ``"▁Hi"``), the merged
    token moves into the completions, and the model is trained on exactly the tokens it would
    see for the whole text.

Truncation (in tokens), TRL's rule so results compare one to one:
    the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its
    start); then completions are cut to ``max_length - len(prompt)`` (keeping their start).
    A pair with no room left for a completion, or whose chosen and rejected become identical,
    is dropped and counted, never trained on (TRL would divide 0 by 0 and log NaN).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from ..hf_helpers import has_chat_template
from ..layout import PairTokens
from .formats import PreferenceExample

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHAT_TEMPLATE", "TokenizeSettings", "TokenizeReport", "tokenize_examples", "render_example", "prompt_bos_id"]

# ChatML, the format most open chat models use; applied when a tokenizer has none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATE_MODES = ("auto", "always", "never")
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class TokenizeSettings:
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation_mode: str = "keep_end"
    chat_template: str = "auto"  # auto | always | never
    add_eos: bool = True


@dataclass
class TokenizeReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    prompt_truncated: int = 0
    completion_truncated: int = 0
    boundary_merges: int = 0
    used_default_template: bool = False

    def summary(self) -> str:
        parts = [f"{self.kept} pairs tokenized"]
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} prompts truncated")
        if self.completion_truncated:
            parts.append(f"{self.completion_truncated} completions truncated")
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{n} dropped ({reason})")
        return ", ".join(parts)


def _apply_template(tokenizer, messages, add_generation_prompt: bool, report: TokenizeReport) -> str:
    template = None
    if not has_chat_template(tokenizer):
        template = DEFAULT_CHAT_TEMPLATE
        if not report.used_default_template:
            report.used_default_template = True
            logger.warning("tokenizer has no chat template; using preftune's default ChatML template for conversational data")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def render_example(tokenizer, ex: PreferenceExample, mode: str, report: TokenizeReport) -> tuple[str, str, str, bool]:
    """Return (prompt_text, chosen_text, rejected_text, templated)."""
    use_template = mode == "always" or (
        mode == "auto" and (ex.conversational or isinstance(ex.prompt, list) or (ex.system is not None and has_chat_template(tokenizer)))
    )
    if mode == "never" and (ex.conversational or isinstance(ex.prompt, list)):
        raise ValueError("conversational data needs a chat template; use --chat_template auto")
    if not use_template:
        prompt = ex.prompt if ex.system is None else f"{ex.system}\n\n{ex.prompt}"
        return prompt, ex.chosen, ex.rejected, False
    prompt_msgs = ex.prompt if isinstance(ex.prompt, list) else [{"role": "user", "content": ex.prompt}]
    if ex.system is not None and not any(m["role"] == "system" for m in prompt_msgs):
        prompt_msgs = [{"role": "system", "content": ex.system}] + prompt_msgs
    prompt_text = _apply_template(tokenizer, prompt_msgs, True, report)
    texts = []
    for completion in (ex.chosen, ex.rejected):
        msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        full = _apply_template(tokenizer, prompt_msgs + msgs, False, report)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the full conversation, "
                "so the prompt/completion boundary is ambiguous; pass a simpler --chat_template_file"
            )
        texts.append(full[len(prompt_text):])
    return prompt_text, texts[0], texts[1], True


def prompt_bos_id(tokenizer) -> int | None:
    """The BOS id to put first in every prompt (TRL's rule): the tokenizer's BOS if it has one.

    Some saved tokenizers (e.g. Llama-2's tokenizer.json converted without a BOS post-processor)
    do not add BOS by themselves although the model was trained with it, so we do not rely on
    the tokenizer; a template that already emits BOS is not doubled.
    """
    return tokenizer.bos_token_id


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_examples(tokenizer, examples: list[PreferenceExample], settings: TokenizeSettings) -> tuple[list[PairTokens], TokenizeReport]:
    """Tokenize ``examples``; returns the pairs kept and a report of truncations and drops."""
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {settings.truncation_mode!r}")
    report = TokenizeReport()
    bos = prompt_bos_id(tokenizer)
    eos = tokenizer.eos_token_id
    rendered = [render_example(tokenizer, ex, settings.chat_template, report) for ex in examples]
    prompts = [r[0] for r in rendered]
    chosen_full = [r[0] + r[1] for r in rendered]
    rejected_full = [r[0] + r[2] for r in rendered]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
    p_ids, c_ids, r_ids = enc(prompts), enc(chosen_full), enc(rejected_full)

    pairs: list[PairTokens] = []
    for ex, (_, _, _, templated), p, c, r in zip(examples, rendered, p_ids, c_ids, r_ids):
        if bos is not None and (not p or p[0] != bos):
            p, c, r = [bos] + p, [bos] + c, [bos] + r
        k = min(_common_prefix_len(p, c), _common_prefix_len(p, r))
        if k < len(p):
            report.boundary_merges += 1
        prompt, chosen, rejected = p[:k], c[k:], r[k:]
        if settings.add_eos and eos is not None:
            if not chosen or chosen[-1] != eos:
                chosen = chosen + [eos]
            if not rejected or rejected[-1] != eos:
                rejected = rejected + [eos]
        if not prompt:
            report.dropped["empty prompt after tokenization"] += 1
            continue
        if chosen == rejected:
            report.dropped["chosen equals rejected after tokenization"] += 1
            continue
        if settings.max_prompt_length is not None and len(prompt) > settings.max_prompt_length:
            prompt = prompt[-settings.max_prompt_length :] if settings.truncation_mode == "keep_end" else prompt[: settings.max_prompt_length]
            report.prompt_truncated += 1
        if settings.max_length is not None:
            room = settings.max_length - len(prompt)
            if room < 1:
                report.dropped["no room for the completion (prompt fills max_length)"] += 1
                continue
            if len(chosen) > room or len(rejected) > room:
                report.completion_truncated += 1
                chosen, rejected = chosen[:room], rejected[:room]
                if chosen == rejected:
                    report.dropped["chosen equals rejected after truncation"] += 1
                    continue
        pairs.append(PairTokens(prompt, chosen, rejected, ex.example_id))
    report.kept = len(pairs)
    return pairs, report
