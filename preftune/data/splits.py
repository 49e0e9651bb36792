"""The training and held-out pairs of a run: one path for ``preftune train``, ``preftune eval``
(which rebuilds the split a run held out) and ``preftune data inspect``.

:func:`prepare_data` (training): every source (:mod:`.mixture`) is tokenized once through the
cache (:func:`.cache.tokenized_source`), bad rows are raised or skipped (``--on_bad_row``),
examples are selected (mixture sampling, ``--max_train_samples``, the eval split), and the
selection is cut (:func:`.tokenize.plan_truncation`) into :class:`.store.TokenizedPairs`.

:func:`load_train_eval` makes the same selection over normalised examples without a tokenizer
(for ``preftune eval``). Both count an example by its position among its source's usable
examples, so they select the same rows; example ids are ``base + position`` with the bases of
the sources stacked in order (eval sources from :data:`EVAL_ID_OFFSET`).

The eval split, one of: ``--eval_fraction`` (held out from the selected training examples:
every copy of an up-sampled example goes to one side), ``--eval_split NAME`` (that split of
every training source; a path: that file), or ``eval_datasets:`` (a mixture of its own).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, PreftuneError
from . import LoadedData, column_mismatch_error, held_out_mask, is_column_mismatch, load_examples
from .cache import TokenizedSource, tokenized_source
from .convert import COLUMN_CHECKS
from .formats import ColumnMap, PreferenceExample
from .io import first_record, looks_like_path
from .mixture import DatasetSpec, mixture_order, parse_dataset_entries, sample_counts, select_positions
from .store import TokenizedPairs
from .tokenize import DROP_REASONS, PromptRendering, TokenizeReport, TokenizeSettings, count_truncation, plan_truncation, tokenize_examples
from .unpaired import tokenize_unpaired

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_ID_OFFSET", "columns_of", "tokenize_settings_of", "read_entries", "training_sources", "eval_sources",
    "Selection", "select_examples", "load_sources", "bad_row_error", "LoadedSource", "pairs_of", "prepare_data", "data_from_examples", "TrainingData", "describe_sources", "load_source_examples", "load_train_eval", "tokenize_split",
]

# Example ids of a separate eval split start here, so train and eval ids never collide (the
# precomputed reference table is keyed by example id).
EVAL_ID_OFFSET = 10**9
TEMPLATE_REASONS = ("needs a chat template", "chat template error", "completion not located")


def columns_of(data_args) -> ColumnMap:
    """The column mapping named by a :class:`preftune.config.DataArguments`."""
    return ColumnMap(data_args.prompt_column, data_args.chosen_column, data_args.rejected_column, data_args.system_column,
                     data_args.tools_column, data_args.completion_column, data_args.label_column)


def tokenize_settings_of(data_args) -> TokenizeSettings:
    """The tokenization settings named by a :class:`preftune.config.DataArguments`."""
    return TokenizeSettings(
        max_length=data_args.max_length,
        max_prompt_length=data_args.max_prompt_length,
        truncation_mode=data_args.truncation_mode,
        chat_template=data_args.chat_template,
    )


# --- sources ----------------------------------------------------------------------------------------
def read_entries(value, what: str) -> list | None:
    """A ``datasets:`` value as a list: as given in YAML, or read from a YAML/JSON file (a list,
    or a mapping with a ``datasets:`` key), or parsed from YAML/JSON text."""
    if value is None or isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise PreftuneError(f"{what} must be a list of dataset entries, got {type(value).__name__}")
    import yaml

    path = Path(value).expanduser()
    shape = f"a list of entries like [{{path: data.jsonl, weight: 1}}], or a YAML/JSON file holding one (for one data file: --dataset_name {value})"
    is_file = path.is_file()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8") if is_file else value)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if is_file and mark else ""
        problem = f"invalid YAML/JSON{line}: {getattr(e, 'problem', e)}"
        raise PreftuneError(f"--{what} {value!r}: {'the file holds no list of dataset entries' if is_file else 'not a file, nor a list'} "
                            f"({problem}); --{what} takes {shape}") from None
    if isinstance(data, dict) and what in data:
        data = data[what]
    if not isinstance(data, list):
        raise PreftuneError(f"--{what} {value!r}: {'the file holds' if is_file else 'not a file, nor'} no list of dataset entries; --{what} takes {shape}")
    return data


def _base_spec(data_args) -> DatasetSpec:
    return DatasetSpec(path="", split=data_args.dataset_split, dataset_format=data_args.dataset_format, columns=columns_of(data_args))


def training_sources(data_args) -> list[DatasetSpec]:
    """The training sources of ``data_args``: ``datasets:`` entries, else one per ``--dataset_name``."""
    base = _base_spec(data_args)
    if data_args.datasets:
        return parse_dataset_entries(data_args.datasets, base, "datasets")
    names = data_args.dataset_name or []
    if len(set(names)) != len(names):
        raise PreftuneError(f"--dataset_name lists a dataset twice ({', '.join(names)}); to up-sample one, use datasets: with weights")
    return [dataclasses.replace(base, path=name) for name in names]


def eval_sources(data_args) -> list[DatasetSpec] | None:
    """The sources of a separate eval split, or None (none, or ``--eval_fraction``)."""
    base = _base_spec(data_args)
    if data_args.eval_datasets:
        return parse_dataset_entries(data_args.eval_datasets, base, "eval_datasets")
    if not data_args.eval_split:
        return None
    if Path(data_args.eval_split).expanduser().exists():
        return [dataclasses.replace(base, path=data_args.eval_split, split="train")]
    if looks_like_path(data_args.eval_split):  # a file name, not a split name: the file is missing
        raise PreftuneError(f"--eval_split {data_args.eval_split!r}: file not found")
    specs = []
    for spec in training_sources(data_args):
        if Path(spec.path).expanduser().is_file():
            raise PreftuneError(f"--eval_split {data_args.eval_split!r}: {spec.path!r} is a single file, which has no other split; "
                                "pass --eval_split PATH (a file), --eval_fraction, or eval_datasets:")
        specs.append(DatasetSpec(spec.path, data_args.eval_split, spec.dataset_format, spec.columns, label=spec.label))
    return specs


# --- selection -----------------------------------------------------------------------------------
@dataclass
class Selection:
    """Examples chosen for a split, in order: source index and position within the source."""

    source: np.ndarray
    position: np.ndarray

    def __len__(self) -> int:
        return len(self.position)

    def take(self, idx) -> "Selection":
        return Selection(self.source[idx], self.position[idx])


def _gather(available: list[int], counts: list[int], specs: list[DatasetSpec], seed: int) -> Selection:
    parts = [select_positions(n, k, seed, s.display) for n, k, s in zip(available, counts, specs)]
    source = np.concatenate([np.full(len(p), i, dtype=np.int16) for i, p in enumerate(parts)] or [np.zeros(0, dtype=np.int16)])
    position = np.concatenate(parts or [np.zeros(0, dtype=np.int64)])
    return Selection(source, position)


def select_examples(available: list[int], specs: list[DatasetSpec], data_args, seed: int,
                    eval_available: list[int] | None = None, eval_specs: list[DatasetSpec] | None = None):
    """``(train, eval, counts)``: the selections of a run (module docstring) and the examples
    each training source gave before the eval split."""
    counts = sample_counts(available, specs)
    train = _gather(available, counts, specs, seed)
    if len(specs) > 1 or any(s.samples for s in specs):
        train = train.take(mixture_order(len(train), seed))
    if data_args.max_train_samples is not None:
        train = train.take(slice(0, data_args.max_train_samples))
    evals = Selection(np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.int64))
    if data_args.eval_fraction:
        keys = train.source.astype(np.int64) << 40 | train.position
        unique, first = np.unique(keys, return_index=True)
        in_order = unique[np.argsort(first, kind="stable")]
        held = in_order[held_out_mask(len(in_order), data_args.eval_fraction, seed)]
        is_eval = np.isin(keys, held)
        evals = Selection((held >> 40).astype(np.int16), held & ((1 << 40) - 1))
        train = train.take(~is_eval)
    elif eval_specs:
        evals = _gather(eval_available, sample_counts(eval_available, eval_specs), eval_specs, seed)
    return train, evals, counts


# --- tokenized path (training) ------------------------------------------------------------------------
@dataclass
class LoadedSource:
    spec: DatasetSpec
    tokenized: TokenizedSource
    id_base: int


def bad_row_error(source: LoadedSource, mixture: bool) -> DataError:
    """What ``--on_bad_row error`` stops with on ``source``'s first bad row (``mixture``: name the dataset)."""
    where, reason, detail = source.tokenized.summary.first_bad_row()
    if mixture:
        where = f"dataset {source.spec.display!r}, {where}"
    fix = "fix the row, or pass --on_bad_row skip to skip bad rows"
    if reason in TEMPLATE_REASONS:
        fix = "use a chat template that renders this row (--chat_template_file, --chat_template), or pass --on_bad_row skip"
    return DataError(where, f"{reason}: {detail}", fix)


def load_sources(tokenizer, specs: list[DatasetSpec], data_args, id_start: int = 0, on_bad_row: str | None = None) -> list[LoadedSource]:
    """Tokenize (or read from the cache) every source; apply the bad-row policy."""
    settings = tokenize_settings_of(data_args)
    policy = on_bad_row or data_args.on_bad_row
    out, base = [], id_start
    for spec in specs:
        tokenized = tokenized_source(tokenizer, spec.path, spec.split, spec.columns, spec.dataset_format, settings,
                                     data_args.dataset_cache_dir, data_args.dataset_num_proc)
        source = LoadedSource(spec, tokenized, base)
        summary = tokenized.summary
        if is_column_mismatch(summary.bad, summary.examples):
            where = f"dataset {spec.display!r}" if len(specs) > 1 else spec.display
            first = first_record(spec.path, spec.split)
            if spec.dataset_format != "auto" and first is not None:
                COLUMN_CHECKS[spec.dataset_format]([first], where)  # the format's own columns, named
            raise column_mismatch_error(where, first, spec.columns)
        if summary.bad and policy == "error":
            raise bad_row_error(source, len(specs) > 1)
        if summary.bad:
            skipped = ", ".join(f"{n} ({reason}, first at {summary.first_bad[reason]['where']})" for reason, n in sorted(summary.bad.items()))
            logger.warning("%s: skipped %s", spec.display, skipped)
        if summary.examples == 0:
            raise DataError(spec.display, f"no usable preference pairs ({summary.rows} rows read)",
                            "check the column names (--chosen_column, --rejected_column, --prompt_column)")
        out.append(source)
        base += summary.examples
    return out


def pairs_of(selection: Selection, sources: list[LoadedSource], settings: TokenizeSettings, report: TokenizeReport,
             untruncated: bool = False) -> TokenizedPairs:
    """The pairs of ``selection``, cut by ``settings``; drops and truncations go into ``report``.

    ``untruncated``: skip the cut (``preftune data inspect`` measures the full lengths).
    """
    n = len(selection)
    rows = np.zeros(n, dtype=np.int64)
    status = np.zeros(n, dtype=np.int8)
    lengths = np.zeros((4, n), dtype=np.int64)
    for k, src in enumerate(sources):
        mask = selection.source == k
        if not mask.any():
            continue
        positions = selection.position[mask]
        store = src.tokenized.store
        status[mask] = src.tokenized.example_status[positions]
        r, found = store.rows_of(positions)
        r = np.where(found, r, 0)
        rows[mask] = r
        for j, arr in enumerate((store.prompt_len, store.chosen_len, store.rejected_len, store.common_len)):
            lengths[j, mask] = np.where(found, arr[r], 0) if len(arr) else 0
    for code in np.unique(status[status > 0]):
        report.dropped[DROP_REASONS[int(code)]] += int((status == code).sum())
    bad = int((status < 0).sum())
    if bad:  # bad rows of the template, already reported per source (or raised) by load_sources
        report.dropped["skipped bad row (the chat template cannot render it)"] += bad
    usable = status == 0
    if untruncated:
        keep = usable
        start, p, c, r = np.zeros(n, dtype=np.int64), lengths[0], lengths[1], lengths[2]
    else:
        plan = plan_truncation(lengths[0][usable], lengths[1][usable], lengths[2][usable], lengths[3][usable], settings)
        count_truncation(plan, report)
        start, p, c, r = (np.zeros(n, dtype=np.int64) for _ in range(4))
        for arr, values in ((start, plan.prompt_start), (p, plan.prompt_keep), (c, plan.chosen_keep), (r, plan.rejected_keep)):
            arr[usable] = values
        keep = usable.copy()
        keep[np.flatnonzero(usable)[plan.drop != 0]] = False
    ids = np.array([s.id_base for s in sources], dtype=np.int64)[selection.source] + selection.position
    pairs = TokenizedPairs([s.tokenized.store for s in sources], selection.source[keep], rows[keep], ids[keep],
                           start[keep], p[keep], c[keep], r[keep])
    report.kept = len(pairs)
    return pairs


@dataclass
class TrainingData:
    """What the data stage hands to training: the pairs, and what they are made of."""

    train_pairs: TokenizedPairs
    eval_pairs: TokenizedPairs
    sources: list[dict] = field(default_factory=list)  # per-source counts (log, run_config.json, model card)
    train_report: TokenizeReport | None = None
    eval_report: TokenizeReport | None = None
    rendering: PromptRendering = field(default_factory=PromptRendering)  # plain text or a chat template (run_config.json)

    @property
    def default_template(self) -> bool:
        """Conversational rows were rendered with preftune's default ChatML template."""
        return self.rendering.default_template


def describe_sources(specs: list[DatasetSpec]) -> str:
    """The data of a run in one phrase (run_config.json, the model card)."""
    if len(specs) == 1:
        return specs[0].display
    return f"mixture of {len(specs)} datasets ({', '.join(s.display for s in specs)})"


def _source_rows(sources: list[LoadedSource], selected: list[int], pairs: dict[str, TokenizedPairs], role: str) -> list[dict]:
    rows = []
    for k, src in enumerate(sources):
        summary = src.tokenized.summary
        row = {"dataset": src.spec.display, "path": src.spec.path, "split": src.spec.split, "role": role, "sampling": src.spec.sampling,
               "rows": summary.rows, "examples": summary.examples, "bad_rows": sum(summary.bad.values()), "selected": selected[k]}
        for name, p in pairs.items():
            row[f"{name}_pairs"] = int((p.store_index == k).sum())
        row["cached"] = src.tokenized.from_cache
        rows.append(row)
    return rows


def prepare_data(tokenizer, data_args, seed: int) -> TrainingData:
    """The tokenized training and eval pairs of a run (module docstring)."""
    specs = training_sources(data_args)
    if not specs:
        raise PreftuneError("no training data: pass --dataset_name or a datasets: list")
    settings = tokenize_settings_of(data_args)
    sources = load_sources(tokenizer, specs, data_args)
    espec = eval_sources(data_args)
    esources = load_sources(tokenizer, espec, data_args, id_start=EVAL_ID_OFFSET) if espec else []
    train_sel, eval_sel, counts = select_examples(
        [s.tokenized.summary.examples for s in sources], specs, data_args, seed,
        [s.tokenized.summary.examples for s in esources], espec,
    )
    train_report, eval_report = TokenizeReport(), TokenizeReport()
    train = pairs_of(train_sel, sources, settings, train_report)
    if esources:
        evals = pairs_of(eval_sel, esources, settings, eval_report)
    else:
        evals = pairs_of(eval_sel, sources, settings, eval_report)
    for name, pairs, sel, report in (("train data", train, train_sel, train_report), ("eval data", evals, eval_sel, eval_report)):
        if len(sel):
            logger.info("%s: %s", name, report.summary())
        if len(sel) and not len(pairs):
            raise PreftuneError(f"{name}: every pair was dropped during tokenization ({report.summary()}); raise --max_length")
    if esources:
        rows = _source_rows(sources, counts, {"train": train}, "train")
        rows += _source_rows(esources, [int((eval_sel.source == k).sum()) for k in range(len(esources))], {"eval": evals}, "eval")
    else:
        rows = _source_rows(sources, counts, {"train": train, "eval": evals}, "train")
    for row in rows:
        logger.info("data: %s [%s] (%s): %d rows, %d bad, %d examples, %d selected -> %d train / %d eval pairs", row["dataset"], row["split"],
                    row["sampling"], row["rows"], row["bad_rows"], row["examples"], row["selected"], row.get("train_pairs", 0), row.get("eval_pairs", 0))
    rendering = PromptRendering.from_notes([src.tokenized.summary.notes for src in sources + esources])
    return TrainingData(train, evals, rows, train_report, eval_report if len(eval_sel) else None, rendering)


def data_from_examples(tokenizer, train: list, evals: list, settings: TokenizeSettings, unpaired: bool = False,
                       kl_group: int | None = None) -> TrainingData:
    """:class:`TrainingData` of examples tokenized in memory: the built-in demo, and unpaired
    (KTO) runs, whose KL completions follow the data order (:mod:`preftune.data.unpaired`)."""
    kind = dict(unpaired=unpaired, kl_group=kl_group)
    train_pairs, train_report = tokenize_split(tokenizer, train, settings, "train data", **kind)
    eval_pairs, eval_report = tokenize_split(tokenizer, evals, settings, "eval data", **kind) if evals else ([], None)
    rendering = PromptRendering.from_notes([r.notes for r in (train_report, eval_report) if r is not None])
    return TrainingData(TokenizedPairs.from_pairs(train_pairs), TokenizedPairs.from_pairs(eval_pairs), [], train_report, eval_report,
                        rendering)


# --- examples path (preftune eval) ------------------------------------------------------------------
def _load_all(specs: list[DatasetSpec], data_args, id_start: int, unpaired: bool = False) -> tuple[list[list], LoadedData]:
    merged = LoadedData(examples=[])
    lists, base = [], id_start
    for spec in specs:
        try:
            loaded = load_examples(spec.path, spec.split, spec.columns, data_args.on_bad_row, spec.dataset_format, id_offset=base,
                                   unpaired=unpaired)
        except DataError as e:
            if len(specs) > 1:
                raise DataError(f"dataset {spec.display!r}, {e.where}", e.problem, e.fix) from None
            raise
        if loaded.skipped:
            logger.warning("%s: %s", spec.display, loaded.skip_summary())
        merged.skipped.update(loaded.skipped)
        for reason, where in loaded.first_skipped.items():
            merged.first_skipped.setdefault(reason, where)
        lists.append(loaded.examples)
        base += len(loaded.examples)
    return lists, merged


def load_source_examples(source_args, seed: int = 42) -> tuple[list[PreferenceExample], LoadedData]:
    """Every example the sources of ``source_args`` select (``preftune eval --dataset_name A B``,
    or a ``datasets:`` mixture), without a tokenizer; ``(examples, loaded)``."""
    specs = training_sources(source_args)
    lists, loaded = _load_all(specs, source_args, 0)
    counts = sample_counts([len(x) for x in lists], specs)
    selection = _gather([len(x) for x in lists], counts, specs, seed)
    return [lists[s][p] for s, p in zip(selection.source.tolist(), selection.position.tolist())], loaded


def load_train_eval(data_args, seed: int, unpaired: bool = False) -> tuple[list, list, LoadedData]:
    """Training and held-out examples exactly as :func:`prepare_data` selects them, without a
    tokenizer. Returns ``(train, eval, loaded)``; ``loaded`` counts the skipped rows.

    ``unpaired`` (KTO): unpaired rows are read as :class:`preftune.data.UnpairedExample`; pairs
    stay pairs here (split into labelled completions at tokenization, after the eval split, so a
    pair's two halves never land on both sides)."""
    specs = training_sources(data_args)
    lists, loaded = _load_all(specs, data_args, 0, unpaired)
    espec = eval_sources(data_args)
    elists = _load_all(espec, data_args, EVAL_ID_OFFSET, unpaired)[0] if espec else []
    train_sel, eval_sel, _ = select_examples([len(x) for x in lists], specs, data_args, seed, [len(x) for x in elists], espec)
    pick = lambda sel, groups: [groups[s][p] for s, p in zip(sel.source.tolist(), sel.position.tolist())]  # noqa: E731
    train = pick(train_sel, lists)
    evals = pick(eval_sel, elists if espec else lists)
    loaded.examples = [e for group in lists for e in group]
    return train, evals, loaded


def tokenize_split(tokenizer, examples: list, settings: TokenizeSettings, label: str, on_bad_row: str = "error", unpaired: bool = False,
                   kl_group: int | None = None):
    """:func:`tokenize_examples` whose failures name ``label`` (e.g. "train data") in one line.

    ``unpaired``: labelled examples instead (:func:`preftune.data.unpaired.tokenize_unpaired`;
    pairs are split first), each with a KL completion from its group of ``kl_group`` (None: none).
    Logs the tokenization summary; raises when every example of a non-empty split was dropped, or
    when one example is left where KL completions need two. Returns ``(pairs, report)``.
    """
    try:
        if unpaired:
            pairs, report = tokenize_unpaired(tokenizer, examples, settings, kl_group)
        else:
            pairs, report = tokenize_examples(tokenizer, examples, settings, on_bad_row)
    except ValueError as e:
        raise PreftuneError(f"{label}: {e}") from None
    logger.info("%s: %s", label, report.summary())
    if not pairs and examples:
        raise PreftuneError(f"{label}: every example was dropped during tokenization ({report.summary()}); raise --max_length")
    if kl_group is not None and len(pairs) == 1:
        raise PreftuneError(f"{label}: one example left after tokenization; the KL term needs at least two (each example is scored "
                            "with another example's completion)")
    return pairs, report
