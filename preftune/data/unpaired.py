"""Unpaired data for KTO: single completions labelled desirable (True) or undesirable (False).

Rows (columns remappable with ``--prompt_column``, ``--completion_column``, ``--label_column``)::

    {"prompt": "...", "completion": "...", "label": true}
    {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": false}

``label`` must be a boolean (CSV/TSV cells ``true``/``false`` are read as such); anything else is a
bad row. Preference pairs are accepted too and split as TRL 1.16's ``unpair_preference_dataset``
does: within each block of 1000 rows, every chosen completion (desirable) in row order, then every
rejected one (undesirable). An unpaired example from pair ``i`` gets example id ``2i`` (chosen) or
``2i + 1`` (rejected), so ids stay distinct across train and eval.

KL completions (TRL 1.16's rule, ``KTOTrainer._prepare_dataset``): after tokenization and
dropping, the examples are cut in order into groups of ``per_device_train_batch_size``; within a
group each example's KL completion is the previous example's completion, and the first example's
is the group's last completion, ``(x1,y1)..(xn,yn) -> (x1,yn), (x2,y1), ..., (xn,y(n-1))``. So a
batch's mismatched completions are the batch's own completions, each after another prompt. A
trailing group of one example gets its own completion (as in TRL). Training then takes batches in
data order (the config sets ``train_sampling_strategy=sequential``).

Tokenization follows :mod:`preftune.data.tokenize` (same boundary, BOS/EOS and truncation rules).
An example becomes a :class:`~preftune.layout.PairTokens` with ``chosen`` = its completion,
``rejected`` = its KL completion (cut to the same room after the prompt; empty when the loss
needs none) and ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layout import PairTokens
from .formats import BadRow, ColumnMap, PreferenceExample, as_text, check_messages
from .io import BadRecord, Record
from .tokenize import (
    TRUNCATION_MODES,
    TokenizeReport,
    TokenizeSettings,
    completion_room,
    encode_texts,
    render_completions,
    split_at_prompt,
    truncate_prompt,
)

__all__ = ["UnpairedExample", "is_unpaired_record", "normalize_unpaired_record", "unpair_examples", "tokenize_unpaired", "add_kl_completions",
           "UNPAIR_BLOCK"]

# rows per batch of datasets.map in TRL's unpair_preference_dataset (its default batch size)
UNPAIR_BLOCK = 1000


@dataclass
class UnpairedExample:
    """One labelled completion, normalised. ``prompt``/``completion`` are strings or message lists."""

    prompt: Any
    completion: Any
    label: bool
    system: str | None
    where: str
    example_id: int


def is_unpaired_record(record, columns: ColumnMap) -> bool:
    """Whether ``record`` has the unpaired shape (a completion column, no chosen/rejected pair)."""
    return isinstance(record, Record) and columns.completion in record.row and not (
        columns.chosen in record.row and columns.rejected in record.row
    )


def _label(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV/TSV cells
        return value.strip().lower() == "true"
    return None


def _content(value, field: str) -> tuple[Any, str | None]:
    """A string or message-list field, normalised, or the problem with it."""
    if isinstance(value, list):
        problem = check_messages(value, field)
        return ([{"role": m["role"], "content": m["content"]} for m in value], None) if problem is None else (None, problem)
    return as_text(value, field)


def normalize_unpaired_record(record: Record | BadRecord, columns: ColumnMap, example_id: int) -> UnpairedExample | BadRow:
    """Turn one raw unpaired row into an :class:`UnpairedExample`, or explain why it is bad."""
    if isinstance(record, BadRecord):
        return BadRow(record.where, record.reason, record.detail)
    row, where = record.row, record.where
    for field, flag in ((columns.prompt, "prompt"), (columns.completion, "completion"), (columns.label, "label")):
        if field not in row:
            have = ", ".join(sorted(map(str, row.keys()))) or "none"
            return BadRow(where, "missing column", f"no {field!r} column (columns: {have}); unpaired (KTO) rows need prompt, completion "
                          f"and label (true/false); map yours with --{flag}_column")
    label = _label(row[columns.label])
    if label is None:
        value = row[columns.label]
        return BadRow(where, "wrong type", f"{columns.label!r} must be true or false, got {value!r} ({type(value).__name__})")
    prompt, problem = _content(row[columns.prompt], columns.prompt)
    if problem is None:
        completion, problem = _content(row[columns.completion], columns.completion)
    if problem is not None:
        reason = "malformed messages" if "message" in problem else "empty field" if "empty" in problem else "wrong type"
        return BadRow(where, reason, problem)
    if isinstance(completion, list) and completion[0]["role"] != "assistant":
        return BadRow(where, "malformed messages", f"{columns.completion!r} must start with an assistant turn")
    system = row.get(columns.system)
    if system is not None and not isinstance(system, str):
        return BadRow(where, "wrong type", f"{columns.system!r} must be a string, got {type(system).__name__}")
    return UnpairedExample(prompt, completion, label, system if system and system.strip() else None, where, example_id)


def unpair_examples(examples: list) -> list[UnpairedExample]:
    """Split preference pairs into labelled completions in TRL's order (see the module docstring);
    unpaired examples pass through unchanged."""
    out: list[UnpairedExample] = []
    block: list[PreferenceExample] = []

    def flush():
        out.extend(UnpairedExample(e.prompt, e.chosen, True, e.system, f"{e.where} (chosen)", 2 * e.example_id) for e in block)
        out.extend(UnpairedExample(e.prompt, e.rejected, False, e.system, f"{e.where} (rejected)", 2 * e.example_id + 1) for e in block)
        block.clear()

    for ex in examples:
        if isinstance(ex, PreferenceExample):
            block.append(ex)
            if len(block) == UNPAIR_BLOCK:
                flush()
        else:
            flush()
            out.append(ex)
    flush()
    return out


def tokenize_unpaired(
    tokenizer, examples: list, settings: TokenizeSettings, kl_group: int | None
) -> tuple[list[PairTokens], TokenizeReport]:
    """Tokenize labelled completions (pairs are split first) into :class:`PairTokens` with labels.

    ``kl_group``: give each example a KL completion from its group of ``kl_group`` examples (the
    training batch size; see the module docstring); None: no KL completions.
    """
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {settings.truncation_mode!r}")
    report = TokenizeReport(unit="examples")
    examples = unpair_examples(examples)
    rendered = [render_completions(tokenizer, ex.prompt, ex.system, [ex.completion], settings.chat_template, report) for ex in examples]
    prompt_ids = encode_texts(tokenizer, [prompt for prompt, _, _ in rendered])
    full_ids = encode_texts(tokenizer, [prompt + completion for prompt, (completion,), _ in rendered])
    kept: list[PairTokens] = []
    for ex, p, f in zip(examples, prompt_ids, full_ids):
        prompt, (completion,), merged = split_at_prompt(tokenizer, p, [f], settings.add_eos)
        report.notes["boundary_merges"] += merged
        if not prompt:
            report.dropped["empty prompt after tokenization"] += 1
            continue
        prompt, cut = truncate_prompt(prompt, settings)
        report.prompt_truncated += cut
        room = completion_room(prompt, settings)
        if room is not None and room < 1:
            report.dropped["no room for the completion (prompt fills max_length)"] += 1
            continue
        kept.append(PairTokens(prompt, completion, [], ex.example_id, label=ex.label))
    report.log_notes()
    if kl_group is not None:
        kept = add_kl_completions(kept, kl_group)
    out: list[PairTokens] = []
    for p in kept:
        room = completion_room(p.prompt, settings)
        if room is not None and len(p.chosen) > room:
            report.completion_truncated += 1
        out.append(PairTokens(p.prompt, p.chosen[:room], p.rejected[:room], p.example_id, label=p.label) if room is not None else p)
    report.kept = len(out)
    return out, report


def add_kl_completions(examples: list[PairTokens], group: int) -> list[PairTokens]:
    """Give each labelled example the KL completion of TRL's rule (module docstring): within each
    consecutive group of ``group`` examples, the previous example's completion (the first one
    takes the group's last)."""
    out = []
    for i, p in enumerate(examples):
        start = i - i % group
        previous = i - 1 if i > start else min(start + group, len(examples)) - 1
        out.append(PairTokens(p.prompt, p.chosen, examples[previous].chosen, p.example_id, label=p.label))
    return out
