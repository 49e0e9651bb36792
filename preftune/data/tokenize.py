"""Rendering and tokenizing preference examples with an exact prompt/completion boundary.

Rendering (text):
    conversational examples go through the tokenizer's chat template: the prompt messages with
    ``add_generation_prompt=True``, and the whole conversation (prompt messages + chosen, prompt
    messages + rejected) without it; a ``tools`` column is passed as ``tools=``. String examples
    are used as they are, unless ``chat_template="always"`` or the row has a ``system`` field and
    the tokenizer has a chat template (truthy-dpo style, as the seeds do by hand), in which case
    the prompt becomes ``[system, user]`` messages. A tokenizer without a chat template gets
    :data:`DEFAULT_CHAT_TEMPLATE` (ChatML), said once in the log. A template that rejects the
    system role (Gemma's raises) gets the system text folded into the first user turn, counted in
    the report. When a rendered conversation ends with the EOS token's text followed only by
    whitespace (ChatML's ``<|im_end|>\\n``), the whitespace is dropped so the completion ends on EOS.

Tokenizing (ids), the boundary rule:
    ``P = enc(prompt)``, ``Fc = enc(full chosen)``, ``Fr = enc(full rejected)``, BOS first when
    the tokenizer has one and the text does not already start with it. Let ``k`` be the longest
    common prefix of ``P``, ``Fc`` and ``Fr``. The pair is ``prompt = P[:k]``,
    ``chosen = Fc[k:] + [eos]``, ``rejected = Fr[k:] + [eos]`` (EOS not doubled). So the prompt
    tokens are always a prefix of the tokenization of the full text, and the model is trained on
    exactly the tokens of the whole conversation:

    * a tokenizer that merges across the boundary (SentencePiece ``"A: "`` + ``"Hi"`` ->
      ``"▁Hi"``) moves the merged token into the completions;
    * a template whose generation prompt is not a prefix of the full conversation (DeepSeek-R1's
      generation prompt opens ``<think>``, which the rendered answer does not have) is aligned
      the same way: the prompt ends where the two renderings part, the completion is the
      conversation's own rendering of the answer. Counted as ``not_prefix`` in the report.

    The completion is refused (a bad row, with the reason) only when it cannot be located: the
    conversation renders nothing after the prompt, or it renders the *prompt's own turns*
    differently once the answer is appended (then ``k`` falls before the end of the prompt
    messages rendered without a generation prompt, allowing one merged token).

    Trained turn: the completion is everything after the prompt, i.e. from the first assistant
    turn where chosen and rejected differ to the end (normally the final assistant turn). Earlier
    turns are prompt; ``--nll_on_prompt`` adds the prompt tokens to the NLL term.

Truncation (in tokens), TRL's rule so results compare one to one (:func:`plan_truncation`):
    the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its
    start); then completions are cut to ``max_length - len(prompt)`` (keeping their start).
    A pair with no room left for a completion, or whose chosen and rejected become identical,
    is dropped and counted, never trained on (TRL would divide 0 by 0 and log NaN). Truncation
    works on lengths only, so the tokenized cache (:mod:`preftune.data.cache`) holds untruncated
    ids and a change of ``max_length`` re-uses it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..hf_helpers import has_chat_template
from ..layout import PairTokens
from .formats import PreferenceExample, common_prefix_len

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "TokenizeSettings", "TokenizeReport", "Encoded", "encode_examples", "tokenize_examples", "prompt_bos_id",
    "render_example", "render_completions", "encode_texts", "split_at_prompt", "truncate_prompt", "completion_room",
    "plan_truncation", "TruncationPlan", "DROP_REASONS", "NOTES", "PromptRendering",
]

# ChatML, the format most open chat models use; applied when a tokenizer has none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATE_MODES = ("auto", "always", "never")
TRUNCATION_MODES = ("keep_end", "keep_start")

# Per-example notes (bit flags), summed into the report. ``templated`` / ``plain_text``: the example
# was rendered through a chat template / used as plain text (what the run records, so that
# ``preftune chat`` prompts the model the way it was trained).
NOTE_DEFAULT_TEMPLATE, NOTE_SYSTEM_FOLDED, NOTE_NOT_PREFIX, NOTE_MERGE, NOTE_TEMPLATED, NOTE_PLAIN_TEXT = 1, 2, 4, 8, 16, 32
NOTES = {
    NOTE_DEFAULT_TEMPLATE: "default_template",
    NOTE_SYSTEM_FOLDED: "system_folded",
    NOTE_NOT_PREFIX: "not_prefix",
    NOTE_MERGE: "boundary_merges",
    NOTE_TEMPLATED: "templated",
    NOTE_PLAIN_TEXT: "plain_text",
}

# Why a pair is dropped, by code (0 = kept). The first two happen at tokenization, the last two
# at truncation.
DROP_REASONS = (
    None,
    "empty prompt after tokenization",
    "chosen equals rejected after tokenization",
    "no room for the completion (prompt fills max_length)",
    "chosen equals rejected after truncation",
)
DROP_EMPTY_PROMPT, DROP_IDENTICAL, DROP_NO_ROOM, DROP_IDENTICAL_TRUNCATED = 1, 2, 3, 4


@dataclass
class TokenizeSettings:
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation_mode: str = "keep_end"
    chat_template: str = "auto"  # auto | always | never
    add_eos: bool = True

    def encoding_key(self) -> dict:
        """The settings that change token ids before truncation (the tokenized cache's key)."""
        return {"chat_template": self.chat_template, "add_eos": self.add_eos}


@dataclass
class TokenizeReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    bad: Counter = field(default_factory=Counter)  # reason -> count (rows the template cannot render)
    first_bad: dict = field(default_factory=dict)  # reason -> "where: detail"
    prompt_truncated: int = 0
    completion_truncated: int = 0
    notes: Counter = field(default_factory=Counter)  # NOTES name -> count
    unit: str = "pairs"  # "examples" for unpaired data

    @property
    def boundary_merges(self) -> int:
        return self.notes["boundary_merges"]

    @property
    def used_default_template(self) -> bool:
        return self.notes["default_template"] > 0

    def add_notes(self, flags: int, count: int = 1) -> None:
        for bit, name in NOTES.items():
            if flags & bit:
                self.notes[name] += count

    def summary(self) -> str:
        parts = [f"{self.kept} {self.unit} tokenized"]
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} prompts truncated")
        if self.completion_truncated:
            parts.append(f"{self.completion_truncated} completions truncated")
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{n} dropped ({reason})")
        for reason, n in sorted(self.bad.items()):
            parts.append(f"{n} skipped ({reason}, first at {self.first_bad[reason]})")
        return ", ".join(parts)

    def log_notes(self) -> None:
        """One log line per template behaviour seen (not one per row)."""
        if self.notes["default_template"]:
            logger.warning("tokenizer has no chat template; using preftune's default ChatML template for conversational data")
        if self.notes["system_folded"]:
            logger.warning("the chat template has no system role: the system text was folded into the first user turn (%d pairs)",
                           self.notes["system_folded"])
        if self.notes["not_prefix"]:
            logger.warning("the chat template's generation prompt is not a prefix of the rendered conversation (%d pairs): "
                           "the prompt ends where the two renderings part and the completion is the conversation's own "
                           "rendering of the answer", self.notes["not_prefix"])


@dataclass
class PromptRendering:
    """How a run's examples were rendered, recorded in ``run_config.json`` under :attr:`RECORD_KEY`
    so that ``preftune chat --format auto`` prompts the model the way training did.

    ``templated``: examples rendered through a chat template (conversations, string rows with a
    system column when the tokenizer has a template, ``--chat_template always``); ``plain_text``:
    examples used as the text they are; ``default_template``: the template was preftune's default
    ChatML (the tokenizer had none; the run saves it as the tokenizer's own).
    """

    RECORD_KEY = "prompt_rendering"

    templated: int = 0
    plain_text: int = 0
    default_template: bool = False

    @classmethod
    def from_notes(cls, notes: list) -> PromptRendering:
        """From :data:`NOTES` counts (a report's or a cached source's ``notes``), summed."""
        return cls(sum(int(n.get("templated", 0)) for n in notes), sum(int(n.get("plain_text", 0)) for n in notes),
                   any(n.get("default_template") for n in notes))

    def to_record(self) -> dict:
        return {"templated": self.templated, "plain_text": self.plain_text, "default_template": self.default_template}

    @classmethod
    def from_run_config(cls, run_config: dict | None) -> PromptRendering | None:
        """The record of a run (None: a run from before the record, or not a run)."""
        record = (run_config or {}).get(cls.RECORD_KEY)
        if not isinstance(record, dict):
            return None
        try:
            return cls(int(record.get("templated", 0)), int(record.get("plain_text", 0)), bool(record.get("default_template")))
        except (TypeError, ValueError):
            return None


class TemplateProblem(Exception):
    """A row the chat template cannot turn into a prompt and a completion (a bad row)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Rendered:
    prompt: str
    chosen_full: str  # prompt + chosen as the template renders the whole conversation
    rejected_full: str
    prompt_turns: str | None  # the prompt messages without a generation prompt (only when needed)
    notes: int = 0
    templated: bool = False


def _render(tokenizer, messages, add_generation_prompt: bool, tools) -> str:
    template = None if has_chat_template(tokenizer) else DEFAULT_CHAT_TEMPLATE
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template, **kwargs)


def _fold_system(messages: list[dict]) -> list[dict]:
    """The system text prepended to the first user turn (for templates without a system role)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return rest


def _end_on_eos(text: str, eos_text: str | None) -> str:
    stripped = text.rstrip()
    return stripped if eos_text and stripped.endswith(eos_text) else text


def render_example(tokenizer, ex: PreferenceExample, mode: str) -> Rendered:
    """The texts of one example (see the module docstring); raises TemplateProblem."""
    use_template = mode == "always" or (
        mode == "auto" and (ex.conversational or isinstance(ex.prompt, list) or (ex.system is not None and has_chat_template(tokenizer)))
    )
    if mode == "never" and (ex.conversational or isinstance(ex.prompt, list)):
        raise TemplateProblem("needs a chat template", "conversational data needs a chat template; use --chat_template auto")
    if not use_template:
        prompt = ex.prompt if ex.system is None else f"{ex.system}\n\n{ex.prompt}"
        return Rendered(prompt, prompt + ex.chosen, prompt + ex.rejected, None, NOTE_PLAIN_TEXT)
    prompt_msgs = ex.prompt if isinstance(ex.prompt, list) else [{"role": "user", "content": ex.prompt}]
    if ex.system is not None and not any(m["role"] == "system" for m in prompt_msgs):
        prompt_msgs = [{"role": "system", "content": ex.system}] + prompt_msgs
    completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in (ex.chosen, ex.rejected)]
    notes = NOTE_TEMPLATED | (0 if has_chat_template(tokenizer) else NOTE_DEFAULT_TEMPLATE)
    try:
        prompt_text = _render(tokenizer, prompt_msgs, True, ex.tools)
    except Exception as e:  # jinja's raise_exception, or a template that trips over the row
        if not any(m["role"] == "system" for m in prompt_msgs):
            raise TemplateProblem("chat template error", str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
        prompt_msgs, notes = _fold_system(prompt_msgs), notes | NOTE_SYSTEM_FOLDED
        try:
            prompt_text = _render(tokenizer, prompt_msgs, True, ex.tools)
        except Exception as e2:
            raise TemplateProblem("chat template error", str(e2).splitlines()[0][:200] if str(e2) else type(e2).__name__) from None
    eos_text = getattr(tokenizer, "eos_token", None)
    fulls = []
    for msgs in completions:
        try:
            fulls.append(_end_on_eos(_render(tokenizer, prompt_msgs + msgs, False, ex.tools), eos_text))
        except Exception as e:
            raise TemplateProblem("chat template error", str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
    prompt_turns = None
    if not (fulls[0].startswith(prompt_text) and fulls[1].startswith(prompt_text)):
        notes |= NOTE_NOT_PREFIX
        try:
            prompt_turns = _render(tokenizer, prompt_msgs, False, ex.tools)
        except Exception:  # a template that insists on a generation prompt: nothing to check against
            prompt_turns = None
    return Rendered(prompt_text, fulls[0], fulls[1], prompt_turns, notes, templated=True)


def render_completions(tokenizer, prompt, system: str | None, completions: list, mode: str, report: TokenizeReport) -> tuple[str, list[str], bool]:
    """A prompt and the completions that follow it as text: ``(prompt_text, completion_texts, templated)``
    (unpaired examples, :mod:`preftune.data.unpaired`).

    Same template rule as :func:`render_example`; each completion text is the suffix the template
    adds after the prompt, and a template whose generation prompt is not a prefix of the
    conversation is refused here (``ValueError``).
    """
    conversational = isinstance(prompt, list) or any(isinstance(c, list) for c in completions)
    use_template = mode == "always" or (mode == "auto" and (conversational or (system is not None and has_chat_template(tokenizer))))
    if mode == "never" and conversational:
        raise ValueError("conversational data needs a chat template; use --chat_template auto")
    if not use_template:
        report.notes["plain_text"] += 1
        return (prompt if system is None else f"{system}\n\n{prompt}"), list(completions), False
    prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None and not any(m["role"] == "system" for m in prompt_msgs):
        prompt_msgs = [{"role": "system", "content": system}] + prompt_msgs
    report.notes["templated"] += 1
    if not has_chat_template(tokenizer):
        report.notes["default_template"] += 1
    prompt_text = _render(tokenizer, prompt_msgs, True, None)
    texts = []
    for completion in completions:
        msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        full = _render(tokenizer, prompt_msgs + msgs, False, None)
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


@dataclass
class Encoded:
    """One example's untruncated ids, or why it has none.

    ``drop`` is a :data:`DROP_REASONS` code (0 = usable); ``bad`` is ``(reason, detail)`` when the
    template cannot render the row. ``common`` = longest common prefix of chosen and rejected
    (so truncation can tell, from lengths alone, when the cut makes them identical).
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    common: int = 0
    notes: int = 0
    drop: int = 0
    bad: tuple[str, str] | None = None


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's special tokens."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def split_at_prompt(tokenizer, prompt_ids: list[int], full_ids: list[list[int]], add_eos: bool = True) -> tuple[list[int], list[list[int]], bool]:
    """The boundary rule of the module docstring for one prompt and the full texts that extend it
    (unpaired examples; pairs go through :func:`encode_examples`).

    Returns ``(prompt, completions, merged)``: the longest common prefix of ``prompt_ids`` and
    every ``full_ids`` (after the BOS rule), each full text's tokens after it (EOS appended once),
    and whether a token merged across the boundary.
    """
    bos, eos = prompt_bos_id(tokenizer), tokenizer.eos_token_id
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids, full_ids = [bos] + prompt_ids, [[bos] + f for f in full_ids]
    k = min(common_prefix_len(prompt_ids, f) for f in full_ids)
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


def encode_examples(tokenizer, examples: list[PreferenceExample], mode: str = "auto", add_eos: bool = True) -> list[Encoded]:
    """Render and tokenize ``examples`` (one batched tokenizer call per text kind), untruncated."""
    rendered: list[Rendered | TemplateProblem] = []
    for ex in examples:
        try:
            rendered.append(render_example(tokenizer, ex, mode))
        except TemplateProblem as problem:
            rendered.append(problem)
    ok = [r for r in rendered if isinstance(r, Rendered)]
    p_ids = iter(encode_texts(tokenizer, [r.prompt for r in ok]))
    c_ids = iter(encode_texts(tokenizer, [r.chosen_full for r in ok]))
    r_ids = iter(encode_texts(tokenizer, [r.rejected_full for r in ok]))
    t_ids = iter(encode_texts(tokenizer, [r.prompt_turns for r in ok if r.prompt_turns is not None]))
    bos, eos = prompt_bos_id(tokenizer), tokenizer.eos_token_id
    out = []
    for r in rendered:
        if isinstance(r, TemplateProblem):
            out.append(Encoded([], [], [], bad=(r.reason, r.detail)))
            continue
        p, c, rj = next(p_ids), next(c_ids), next(r_ids)
        turns = next(t_ids) if r.prompt_turns is not None else None
        if bos is not None and (not p or p[0] != bos):
            p, c, rj = [bos] + p, [bos] + c, [bos] + rj
            turns = None if turns is None else [bos] + turns
        k = min(common_prefix_len(p, c), common_prefix_len(p, rj))
        notes = r.notes
        if r.templated and (k == len(c) or k == len(rj)):
            out.append(Encoded([], [], [], bad=("completion not located", "the chat template renders nothing after the prompt for the answer")))
            continue
        if turns is not None and k < len(turns) - 1:
            seen = common_prefix_len(turns, c)
            out.append(Encoded([], [], [], bad=(
                "completion not located",
                f"the chat template renders the prompt's own turns differently once the answer is appended (they part at "
                f"token {seen} of {len(turns)}), so the answer cannot be separated from the prompt; use a template whose "
                "conversation rendering starts with its prompt rendering (--chat_template_file)",
            )))
            continue
        if k < len(p) and not notes & NOTE_NOT_PREFIX:
            notes |= NOTE_MERGE
        prompt, chosen, rejected = p[:k], c[k:], rj[k:]
        if add_eos and eos is not None:
            if not chosen or chosen[-1] != eos:
                chosen = chosen + [eos]
            if not rejected or rejected[-1] != eos:
                rejected = rejected + [eos]
        drop = DROP_EMPTY_PROMPT if not prompt else DROP_IDENTICAL if chosen == rejected else 0
        out.append(Encoded(prompt, chosen, rejected, common_prefix_len(chosen, rejected), notes, drop))
    return out


@dataclass
class TruncationPlan:
    """Per-pair cut of untruncated lengths; arrays ``(N,)``.

    Pair ``i`` keeps prompt tokens ``[prompt_start, prompt_start + prompt_keep)`` and the first
    ``chosen_keep`` / ``rejected_keep`` completion tokens; ``drop`` is a :data:`DROP_REASONS` code.
    """

    prompt_start: np.ndarray
    prompt_keep: np.ndarray
    chosen_keep: np.ndarray
    rejected_keep: np.ndarray
    drop: np.ndarray
    prompt_truncated: np.ndarray  # bool
    completion_truncated: np.ndarray  # bool


def plan_truncation(prompt_len, chosen_len, rejected_len, common_len, settings: TokenizeSettings) -> TruncationPlan:
    """TRL's truncation rule (module docstring) on length arrays, vectorised."""
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {settings.truncation_mode!r}")
    p = np.asarray(prompt_len, dtype=np.int64)
    c = np.asarray(chosen_len, dtype=np.int64)
    r = np.asarray(rejected_len, dtype=np.int64)
    common = np.asarray(common_len, dtype=np.int64)
    keep_p = p if settings.max_prompt_length is None else np.minimum(p, settings.max_prompt_length)
    start = (p - keep_p) if settings.truncation_mode == "keep_end" else np.zeros_like(p)
    drop = np.zeros(len(p), dtype=np.int8)
    if settings.max_length is None:
        keep_c, keep_r = c, r
        cut = np.zeros(len(p), dtype=bool)
    else:
        room = settings.max_length - keep_p
        drop[room < 1] = DROP_NO_ROOM
        room = np.maximum(room, 0)
        keep_c, keep_r = np.minimum(c, room), np.minimum(r, room)
        cut = ((c > room) | (r > room)) & (drop == 0)
        # identical after the cut: same kept length, and they agree on all of it
        same = cut & (keep_c == keep_r) & (common >= keep_c)
        drop[same] = DROP_IDENTICAL_TRUNCATED
    return TruncationPlan(start, keep_p, keep_c, keep_r, drop, keep_p < p, cut)


def count_truncation(plan: TruncationPlan, report: TokenizeReport) -> None:
    """Add a plan's truncations and drops to ``report`` (TRL-comparable counts: a pair dropped for
    having no room is not also counted as truncated)."""
    report.prompt_truncated += int(plan.prompt_truncated.sum())
    report.completion_truncated += int(plan.completion_truncated.sum())
    for code in (DROP_NO_ROOM, DROP_IDENTICAL_TRUNCATED):
        n = int((plan.drop == code).sum())
        if n:
            report.dropped[DROP_REASONS[code]] += n


def tokenize_examples(tokenizer, examples: list[PreferenceExample], settings: TokenizeSettings,
                      on_bad_row: str = "error") -> tuple[list[PairTokens], TokenizeReport]:
    """Tokenize ``examples`` in memory; returns the pairs kept and a report of truncations and drops.

    A row the template cannot render raises ``ValueError`` naming it (``on_bad_row="error"``) or
    is counted in ``report.bad`` (``"skip"``). Large datasets go through
    :func:`preftune.data.cache.tokenized_source` instead (same rules, cached, on disk).
    """
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {settings.truncation_mode!r}")
    report = TokenizeReport()
    encoded = encode_examples(tokenizer, examples, settings.chat_template, settings.add_eos) if examples else []
    usable: list[tuple[PreferenceExample, Encoded]] = []
    for ex, enc in zip(examples, encoded):
        report.add_notes(enc.notes)
        if enc.bad is not None:
            if on_bad_row == "error":
                raise ValueError(f"{ex.where}: {enc.bad[0]}: {enc.bad[1]}")
            report.bad[enc.bad[0]] += 1
            report.first_bad.setdefault(enc.bad[0], ex.where)
        elif enc.drop:
            report.dropped[DROP_REASONS[enc.drop]] += 1
        else:
            usable.append((ex, enc))
    report.log_notes()
    lengths = np.array([(len(e.prompt), len(e.chosen), len(e.rejected), e.common) for _, e in usable], dtype=np.int64).reshape(-1, 4)
    plan = plan_truncation(lengths[:, 0], lengths[:, 1], lengths[:, 2], lengths[:, 3], settings)
    count_truncation(plan, report)
    pairs = []
    for i, (ex, enc) in enumerate(usable):
        if plan.drop[i]:
            continue
        s, kp = int(plan.prompt_start[i]), int(plan.prompt_keep[i])
        pairs.append(PairTokens(enc.prompt[s : s + kp], enc.chosen[: int(plan.chosen_keep[i])], enc.rejected[: int(plan.rejected_keep[i])], ex.example_id))
    report.kept = len(pairs)
    return pairs, report
