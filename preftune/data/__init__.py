"""Preference data: reading, normalising, tokenizing. See each module's docstring."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError, PreftuneError
from .convert import COLUMN_CHECKS, CONVERTERS
from .formats import BadRow, ColumnMap, PreferenceExample, normalize_record
from .io import UNREADABLE_ROW_REASONS, BadRecord, Record, read_records
from .unpaired import UnpairedExample, is_unpaired_record, normalize_unpaired_record

logger = logging.getLogger(__name__)

__all__ = ["LoadedData", "load_examples", "column_mismatch_error", "is_column_mismatch", "split_eval", "held_out_mask", "ColumnMap",
           "PreferenceExample", "UnpairedExample", "BAD_ROW_POLICIES", "DATASET_FORMATS"]

BAD_ROW_POLICIES = ("error", "skip")
DATASET_FORMATS = ("auto", *CONVERTERS)


@dataclass
class LoadedData:
    examples: list  # PreferenceExample, or for unpaired data UnpairedExample
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    first_skipped: dict = field(default_factory=dict)  # reason -> first BadRow message

    def skip_summary(self) -> str:
        if not self.skipped:
            return "no bad rows"
        return "skipped " + ", ".join(f"{n} ({reason}, first at {self.first_skipped[reason]})" for reason, n in sorted(self.skipped.items()))


def is_column_mismatch(bad_counts: dict[str, int], examples: int) -> bool:
    """Whether a dataset's problem is its columns, not some rows: no example came out, and every
    row was either unreadable or missing a column (``bad_counts``: reason -> rows)."""
    return examples == 0 and bool(bad_counts.get("missing column")) and set(bad_counts) <= {"missing column", *UNREADABLE_ROW_REASONS}


def column_mismatch_error(where: str, first: Record | None, columns: ColumnMap) -> DataError:
    """The error for a dataset whose rows lack the chosen/rejected columns: the columns it has,
    those a pair needs, and the flags that map them. It is about the whole dataset, because
    ``--on_bad_row skip`` would skip every row."""
    needs = f"{columns.chosen!r} and {columns.rejected!r} (and optionally {columns.prompt!r})"
    has = f"; {first.where} has {', '.join(map(repr, first.row)) or 'no columns'}" if first is not None else ""
    problem = f"no usable preference pairs: no row has the columns a preference pair needs, {needs}{has}"
    if first is not None and columns.completion in first.row and columns.label in first.row:
        fix = f"these are unpaired rows ({columns.completion!r}, {columns.label!r}): train on unpaired data with --method kto"
    else:
        fix = ("say which of your columns is which: --chosen_column NAME --rejected_column NAME [--prompt_column NAME]; "
               "in a datasets: entry, chosen_column: / rejected_column: / prompt_column:")
    return DataError(where, problem, fix)


def load_examples(
    name: str,
    split: str = "train",
    columns: ColumnMap = ColumnMap(),
    on_bad_row: str = "error",
    dataset_format: str = "auto",
    id_offset: int = 0,
    unpaired: bool = False,
) -> LoadedData:
    """Read ``name`` (file, folder or hub name) and normalise every row.

    ``on_bad_row="error"`` raises :class:`DataError` at the first bad row, naming the file,
    line/row and field; ``"skip"`` drops bad rows and counts them by reason. ``unpaired`` (KTO):
    rows shaped ``prompt, completion, label`` become :class:`UnpairedExample`; a dataset of
    preference pairs (decided by its first row) is read as pairs, to be split later
    (:func:`preftune.data.unpaired.unpair_examples`).
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise PreftuneError(f"--on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
    if dataset_format not in DATASET_FORMATS:
        raise PreftuneError(f"--dataset_format must be one of {', '.join(DATASET_FORMATS)}, got {dataset_format!r}")
    records = read_records(name, split)
    if dataset_format != "auto":
        COLUMN_CHECKS[dataset_format](records, name)
        records = CONVERTERS[dataset_format](records)
    loaded = LoadedData(examples=[])
    first = next((r for r in records if not isinstance(r, BadRecord)), None)
    normalize = normalize_unpaired_record if unpaired and first is not None and is_unpaired_record(first, columns) else normalize_record
    pairs_expected = not unpaired and dataset_format == "auto"
    column_mismatch = None  # whether no row has the chosen and rejected columns; looked at on the first row missing one
    for rec in records:
        # ids count usable examples, as the tokenized cache numbers them (positions)
        result = normalize(rec, columns, example_id=id_offset + len(loaded.examples))
        if isinstance(result, BadRow):
            if pairs_expected and result.reason == "missing column" and column_mismatch is None:
                column_mismatch = not any(isinstance(r, Record) and columns.chosen in r.row and columns.rejected in r.row for r in records)
                if column_mismatch:
                    raise column_mismatch_error(name, first, columns)
            if on_bad_row == "error":
                raise DataError(result.where, f"{result.reason}: {result.detail}", "fix the row, or pass --on_bad_row skip to skip bad rows")
            loaded.skipped[result.reason] += 1
            loaded.first_skipped.setdefault(result.reason, result.where)
            continue
        loaded.examples.append(result)
    if not loaded.examples:
        columns_hint = "--completion_column, --label_column, --prompt_column" if normalize is normalize_unpaired_record else "--chosen_column, --rejected_column, --prompt_column"
        what = "unpaired examples" if normalize is normalize_unpaired_record else "preference pairs"
        raise DataError(name, f"no usable {what} ({loaded.skip_summary()})", f"check the column names ({columns_hint})")
    return loaded


def held_out_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of ``n`` items to hold out: ``max(1, round(n * fraction))`` of them, the first of a
    ``random.Random(seed)`` shuffle (deterministic for a seed; at least one is held out)."""
    if not 0.0 < fraction < 1.0:
        raise PreftuneError(f"--eval_fraction must be between 0 and 1 (exclusive), got {fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise PreftuneError(f"--eval_fraction {fraction} leaves no training data out of {n} pairs")
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(order[:n_eval], dtype=np.int64)] = True
    return mask


def split_eval(examples: list[PreferenceExample], fraction: float, seed: int) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Hold out ``fraction`` of the examples (:func:`held_out_mask`)."""
    held = held_out_mask(len(examples), fraction, seed)
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]
