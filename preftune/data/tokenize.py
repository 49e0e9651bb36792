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

__all__ = ["DEFAULT_CHAT_TEMPLATE", "TokenizeSettings", "TokenizeReport", "tokenize_examples", "render_example", "render_completions",
           "prompt_bos_id", "encode_texts", "split_at_prompt", "truncate_prompt", "completion_room"]

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
    unit: str = "pairs"  # "examples" for unpaired data

    def summary(self) -> str:
        parts = [f"{self.kept} {self.unit} tokenized"]
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
    prompt_text, (chosen, rejected), templated = render_completions(tokenizer, ex.prompt, ex.system, [ex.chosen, ex.rejected], mode, report)
    return prompt_text, chosen, rejected, templated


def render_completions(tokenizer, prompt, system: str | None, completions: list, mode: str, report: TokenizeReport) -> tuple[str, list[str], bool]:
    """Render a prompt and the completions that follow it as text: ``(prompt_text, completion_texts, templated)``.

    Conversational data (message lists) and, in ``auto`` mode, string rows with a system prompt
    go through the chat template (see the module docstring); each completion text is the suffix
    the template adds after the prompt.
    """
    conversational = isinstance(prompt, list) or any(isinstance(c, list) for c in completions)
    use_template = mode == "always" or (mode == "auto" and (conversational or (system is not None and has_chat_template(tokenizer))))
    if mode == "never" and conversational:
        raise ValueError("conversational data needs a chat template; use --chat_template auto")
    if not use_template:
        return (prompt if system is None else f"{system}\n\n{prompt}"), list(completions), False
    prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None and not any(m["role"] == "system" for m in prompt_msgs):
        prompt_msgs = [{"role": "system", "content": system}] + prompt_msgs
    prompt_text = _apply_template(tokenizer, prompt_msgs, True, report)
    texts = []
    for completion in completions:
        msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        full = _apply_template(tokenizer, prompt_msgs + msgs, False, report)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the full conversation, "
                "so the prompt/completion boundary is ambiguous; pass a simpler --chat_template_file"
            )
        texts.append(full[len(prompt_text):])
    return prompt_text, texts, True


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


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's special tokens."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def split_at_prompt(tokenizer, prompt_ids: list[int], full_ids: list[list[int]], add_eos: bool = True) -> tuple[list[int], list[list[int]], bool]:
    """The boundary rule of the module docstring for one prompt and the full texts that extend it.

    Returns ``(prompt, completions, merged)``: the longest common prefix of ``prompt_ids`` and
    every ``full_ids`` (after the BOS rule), each full text's tokens after it (EOS appended once),
    and whether a token merged across the boundary.
    """
    bos, eos = prompt_bos_id(tokenizer), tokenizer.eos_token_id
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids, full_ids = [bos] + prompt_ids, [[bos] + f for f in full_ids]
    k = min(_common_prefix_len(prompt_ids, f) for f in full_ids)
    completions = [f[k:] for f in full_ids]
    if add_eos and eos is not None:
        completions = [c if c and c[-1] == eos else c + [eos] for c in completions]
    return prompt_ids[:k], completions, k < len(prompt_ids)


def truncate_prompt(prompt: list[int], settings: TokenizeSettings) -> tuple[list[int], bool]:
    """The prompt cut to ``max_prompt_length`` by ``truncation_mode``, and whether it was cut."""
    limit = settings.max_prompt_length
    if limit is None or len(prompt) <= limit:
        return prompt, False
    return (prompt[-limit:] if settings.truncation_mode == "keep_end" else prompt[:limit]), True


def completion_room(prompt: list[int], settings: TokenizeSettings) -> int | None:
    """Tokens left for a completion after ``prompt`` (None: no limit)."""
    return None if settings.max_length is None else settings.max_length - len(prompt)


def tokenize_examples(tokenizer, examples: list[PreferenceExample], settings: TokenizeSettings) -> tuple[list[PairTokens], TokenizeReport]:
    """Tokenize ``examples``; returns the pairs kept and a report of truncations and drops."""
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {settings.truncation_mode!r}")
    report = TokenizeReport()
    rendered = [render_example(tokenizer, ex, settings.chat_template, report) for ex in examples]
    p_ids = encode_texts(tokenizer, [r[0] for r in rendered])
    c_ids = encode_texts(tokenizer, [r[0] + r[1] for r in rendered])
    r_ids = encode_texts(tokenizer, [r[0] + r[2] for r in rendered])

    pairs: list[PairTokens] = []
    for ex, p, c, r in zip(examples, p_ids, c_ids, r_ids):
        prompt, (chosen, rejected), merged = split_at_prompt(tokenizer, p, [c, r], settings.add_eos)
        report.boundary_merges += merged
        if not prompt:
            report.dropped["empty prompt after tokenization"] += 1
            continue
        if chosen == rejected:
            report.dropped["chosen equals rejected after tokenization"] += 1
            continue
        prompt, cut = truncate_prompt(prompt, settings)
        report.prompt_truncated += cut
        room = completion_room(prompt, settings)
        if room is not None:
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
