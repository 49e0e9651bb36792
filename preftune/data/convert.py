"""Converters from other table shapes to prompt/chosen/rejected rows."""

from __future__ import annotations

from ..errors import DataError
from .io import BadRecord, Record

__all__ = ["CONVERTERS", "COLUMN_CHECKS", "TRUTHFULQA_COLUMNS_TEXT", "check_truthfulqa_columns", "truthfulqa_to_pairs"]

# Column spellings of the TruthfulQA CSV ("Best Answer") and of the HF dataset ("best_answer").
_TQA_COLUMNS = {
    "question": ("Question", "question"),
    "best": ("Best Answer", "best_answer"),
    "incorrect": ("Incorrect Answers", "incorrect_answers"),
}

# How messages and --help name the columns a TruthfulQA table needs.
TRUTHFULQA_COLUMNS_TEXT = (
    ", ".join(names[0] for names in _TQA_COLUMNS.values())
    + " (or the Hugging Face dataset's " + ", ".join(names[1] for names in _TQA_COLUMNS.values()) + ")"
)


def _pick(row: dict, names: tuple[str, ...]):
    for n in names:
        if n in row:
            return n, row[n]
    return None, None


def _answers(value) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(";")
    return [a.strip() for a in items if isinstance(a, str) and a.strip()]


def truthfulqa_to_pairs(records: list[Record | BadRecord], max_pairs_per_question: int | None = None) -> list[Record | BadRecord]:
    """TruthfulQA table -> preference rows.

    Each question gives pairs ``(prompt=question, chosen=" " + best answer, rejected=" " +
    incorrect answer)``, one per incorrect answer (``;``-separated string or list), up to
    ``max_pairs_per_question`` (seed 004 keeps 1). The leading space matches the seed so the
    answer tokenizes as a continuation of the question.
    """
    out: list[Record | BadRecord] = []
    for rec in records:
        if isinstance(rec, BadRecord):
            out.append(rec)
            continue
        q_col, question = _pick(rec.row, _TQA_COLUMNS["question"])
        b_col, best = _pick(rec.row, _TQA_COLUMNS["best"])
        i_col, incorrect = _pick(rec.row, _TQA_COLUMNS["incorrect"])
        missing = [name for name, col in (("Question", q_col), ("Best Answer", b_col), ("Incorrect Answers", i_col)) if col is None]
        if missing:
            out.append(BadRecord(rec.where, "missing column", f"TruthfulQA format needs column(s) {', '.join(missing)}"))
            continue
        if not isinstance(question, str) or not question.strip():
            out.append(BadRecord(rec.where, "empty field", f"{q_col!r} is empty"))
            continue
        bests = _answers(best)
        wrongs = _answers(incorrect)
        if not bests or not wrongs:
            out.append(BadRecord(rec.where, "empty field", f"{b_col!r} or {i_col!r} has no answer"))
            continue
        if max_pairs_per_question is not None:
            wrongs = wrongs[:max_pairs_per_question]
        for j, wrong in enumerate(wrongs):
            row = {"prompt": question.strip(), "chosen": " " + bests[0], "rejected": " " + wrong}
            out.append(Record(row, f"{rec.where} (incorrect answer {j})"))
    return out


def check_truthfulqa_columns(records: list[Record | BadRecord], source: str) -> None:
    """Raise :class:`DataError` when a column the TruthfulQA format needs is in no row of ``source``.

    That is a whole-file problem (another table, or renamed columns): one message naming the columns
    found and the columns needed, instead of every row reported bad for the same reason. A column
    missing from only some rows stays a per-row problem (:func:`truthfulqa_to_pairs`).
    """
    found = list(dict.fromkeys(name for rec in records if isinstance(rec, Record) for name in rec.row))
    if not found:  # no readable row: nothing tells which columns the table has
        return
    missing = [names[0] for names in _TQA_COLUMNS.values() if not any(name in found for name in names)]
    if missing:
        shown = ", ".join(map(repr, found[:20])) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
        raise DataError(
            source,
            f"not a TruthfulQA table: no column {', '.join(missing)} (columns found: {shown}); the format needs {TRUTHFULQA_COLUMNS_TEXT}",
            "rename the table's columns to those names",
        )


CONVERTERS = {"truthfulqa": truthfulqa_to_pairs}
# Per format: raises DataError when the table lacks a column the format needs in every row (a
# whole-file problem, reported once instead of as every row being bad).
COLUMN_CHECKS = {"truthfulqa": check_truthfulqa_columns}
