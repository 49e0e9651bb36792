"""The tokenized cache: each data source is read, normalised and tokenized once, through
``datasets`` (batched, ``--dataset_num_proc`` processes), and every later run with the same
inputs reads the result from disk.

The key of an entry is :func:`.fingerprint.source_fingerprint`: the content of the data, the
tokenizer, the chat template, the settings that change ids before truncation, and preftune's own
reading/tokenizing code. Not in it, because they are applied when the entry is read (in
milliseconds, on length arrays): ``--max_length``, ``--max_prompt_length``, ``--truncation_mode``
(:func:`.tokenize.plan_truncation`), ``--on_bad_row``, mixture sampling and the eval split.
Changing them re-uses the entry.

An entry is the folder ``<cache dir>/<fingerprint>/``: a :class:`.store.PairStore` (untruncated
ids of the usable examples), the status of every example, and ``summary.json`` (rows read, bad
rows by reason with the first of each, the first ``BAD_ROWS_KEPT`` bad rows one by one,
tokenization drops, row shapes, template notes). It is built in a temporary folder and renamed
into place, so a reader never sees half an entry; concurrent builders of one entry both finish
and the first rename wins. The cache folder is
``--dataset_cache_dir``, else ``$PREFTUNE_CACHE_DIR``, else ``~/.cache/preftune/tokenized``;
deleting it is always safe.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PreftuneError
from .convert import CONVERTERS
from .formats import SHAPES, BadRow, ColumnMap, normalize_record
from .io import BadRecord, Record, SourceLocation, iter_json_lines, load_hub_dataset, parse_json_line, read_records, resolve_source
from .fingerprint import source_fingerprint
from .store import PairStore, PairStoreWriter
from .tokenize import DROP_REASONS, TokenizeReport, TokenizeSettings, encode_examples

logger = logging.getLogger(__name__)

__all__ = ["TokenizedSource", "tokenized_source", "default_cache_dir"]

AUTO_PROC_MIN_ROWS = 20_000  # below this, one process (forking workers costs more than it saves)
PROGRESS_MIN_ROWS = 20_000  # below this, tokenizing takes seconds: no progress bar between the log lines

STATUS_FILE = "example_status.npy"
BAD_ROWS_KEPT = 20  # bad rows a summary lists one by one (`preftune data inspect` shows them); the rest are counted
# Row status in the tokenized table.
KEPT, DROPPED, TEMPLATE_BAD, BAD_ROW = 0, 1, 2, 3


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFTUNE_CACHE_DIR") or Path.home() / ".cache" / "preftune" / "tokenized").expanduser()


@dataclass
class SourceSummary:
    """What reading one source found (``summary.json`` of a cache entry)."""

    rows: int = 0  # raw rows read
    examples: int = 0  # rows that normalised into an example (TruthfulQA: one per pair)
    pairs: int = 0  # examples tokenized into a usable pair (before truncation)
    bad: dict = field(default_factory=dict)  # reason -> count (bad rows, incl. rows the template cannot render)
    first_bad: dict = field(default_factory=dict)  # reason -> {"where", "detail"}
    first_bad_rows: list = field(default_factory=list)  # the first BAD_ROWS_KEPT bad rows in file order: {"where", "reason", "detail"}
    dropped: dict = field(default_factory=dict)  # tokenization drop reason -> count
    shapes: dict = field(default_factory=dict)  # SHAPES name -> count
    notes: dict = field(default_factory=dict)  # tokenize NOTES name -> count
    first_example: str | None = None  # where the first usable pair came from

    def first_bad_row(self) -> tuple[str, str, str] | None:
        """``(where, reason, detail)`` of the earliest bad row in file order, or None."""
        if not self.first_bad:
            return None
        reason = min(self.first_bad, key=lambda r: self.first_bad[r]["order"])
        return self.first_bad[reason]["where"], reason, self.first_bad[reason]["detail"]


@dataclass
class TokenizedSource:
    """One source after tokenization: its pairs, what reading found, and per example (by
    position) ``example_status``: 0 = a pair in ``store``, > 0 a tokenization drop code
    (:data:`.tokenize.DROP_REASONS`), -1 = the chat template could not render it (a bad row)."""

    store: PairStore
    summary: SourceSummary
    example_status: np.ndarray
    fingerprint: str
    from_cache: bool
    seconds: float


# --- building ---------------------------------------------------------------------------------------
def _raw_rows(name: str, split: str, location: SourceLocation, hub_dataset=None):
    """``{"where", "text", "reason", "detail"}`` per raw row: JSON lines stay unparsed (parsed in
    the workers); other formats are read as rows and passed on as JSON text."""
    if location.is_json_lines:
        for where, line in iter_json_lines(location.file):
            yield {"where": where, "text": line, "reason": "", "detail": ""}
        return
    if hub_dataset is not None:
        records = (Record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(hub_dataset))
    else:
        records = read_records(name, split)
    for rec in records:
        if isinstance(rec, BadRecord):
            yield {"where": rec.where, "text": "", "reason": rec.reason, "detail": rec.detail}
        else:
            yield {"where": rec.where, "text": json.dumps(rec.row, default=str, ensure_ascii=False), "reason": "", "detail": ""}


def _tokenize_rows(batch: dict, tokenizer, columns: ColumnMap, dataset_format: str, mode: str, add_eos: bool, json_lines: bool) -> dict:
    """``datasets.map`` function: raw rows -> one output row per example or bad row."""
    records = []
    for where, text, reason, detail in zip(batch["where"], batch["text"], batch["reason"], batch["detail"]):
        if reason:
            records.append(BadRecord(where, reason, detail))
        elif json_lines:
            records.append(parse_json_line(text, where))
        else:
            records.append(Record(json.loads(text), where))
    if dataset_format != "auto":
        records = CONVERTERS[dataset_format](records)
    results = [normalize_record(rec, columns, 0) for rec in records]
    examples = [r for r in results if not isinstance(r, BadRow)]
    encoded = iter(encode_examples(tokenizer, examples, mode, add_eos) if tokenizer is not None and examples else [])
    out = {k: [] for k in ("status", "code", "where", "reason", "detail", "shape", "notes", "ids", "prompt_len", "chosen_len", "rejected_len", "common_len")}

    def emit(status, where="", reason="", detail="", shape=-1, notes=0, code=0, p=(), c=(), r=(), common=0):
        out["status"].append(status)
        out["code"].append(code)
        out["where"].append(where)
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["shape"].append(shape)
        out["notes"].append(notes)
        out["ids"].append([*p, *c, *r])
        out["prompt_len"].append(len(p))
        out["chosen_len"].append(len(c))
        out["rejected_len"].append(len(r))
        out["common_len"].append(common)

    for res in results:
        if isinstance(res, BadRow):
            emit(BAD_ROW, res.where, res.reason, res.detail)
            continue
        shape = SHAPES.index(res.shape)
        enc = next(encoded, None)
        if enc is None:  # no tokenizer: normalisation only
            emit(KEPT, res.where, shape=shape)
        elif enc.bad is not None:
            emit(TEMPLATE_BAD, res.where, enc.bad[0], enc.bad[1], shape, enc.notes)
        elif enc.drop:
            emit(DROPPED, res.where, shape=shape, notes=enc.notes, code=enc.drop)
        else:
            emit(KEPT, res.where, shape=shape, notes=enc.notes, p=enc.prompt, c=enc.chosen, r=enc.rejected, common=enc.common)
    return out


def _output_features():
    from datasets import Features, Sequence, Value

    ints = {k: Value("int32") for k in ("prompt_len", "chosen_len", "rejected_len", "common_len")}
    strings = {k: Value("string") for k in ("where", "reason", "detail")}
    return Features({"status": Value("int8"), "code": Value("int8"), "shape": Value("int8"), "notes": Value("int8"),
                     "ids": Sequence(Value("int32")), **strings, **ints})


def _arrow_batches(paths: list[str]):
    """Record batches of datasets' Arrow stream files, read (not memory-mapped) one at a time."""
    import pyarrow as pa

    for path in paths:
        with pa.OSFile(path, "rb") as f:
            reader = pa.ipc.open_stream(f)
            for batch in reader:
                yield batch


def _collect(batches, writer: PairStoreWriter, summary: SourceSummary) -> np.ndarray:
    """Turn the tokenized table into store rows and summary counts, one batch at a time;
    returns the per-example status (see :class:`TokenizedSource`)."""
    report = TokenizeReport()
    statuses = []
    position = 0
    order = 0
    bad, dropped, shapes = {}, {}, np.zeros(len(SHAPES), dtype=np.int64)
    for batch in batches:
        cols = {name: batch.column(name) for name in batch.schema.names}
        status = cols["status"].to_numpy(zero_copy_only=False)
        is_example = status != BAD_ROW
        positions = position + np.cumsum(is_example) - 1
        position += int(is_example.sum())
        shape = cols["shape"].to_numpy(zero_copy_only=False)
        shapes += np.bincount(shape[is_example].astype(np.int64), minlength=len(SHAPES))[: len(SHAPES)]
        notes = cols["notes"].to_numpy(zero_copy_only=False)
        for flag in np.unique(notes[notes != 0]):
            report.add_notes(int(flag), int((notes == flag).sum()))
        for i in np.flatnonzero((status == BAD_ROW) | (status == TEMPLATE_BAD)):
            reason = cols["reason"][i].as_py()
            bad[reason] = bad.get(reason, 0) + 1
            summary.first_bad.setdefault(reason, {"where": cols["where"][i].as_py(), "detail": cols["detail"][i].as_py(), "order": order + int(i)})
            if len(summary.first_bad_rows) < BAD_ROWS_KEPT:
                summary.first_bad_rows.append({"where": cols["where"][i].as_py(), "reason": reason, "detail": cols["detail"][i].as_py()})
        codes = cols["code"].to_numpy(zero_copy_only=False)
        for code in np.unique(codes[status == DROPPED]):
            reason = DROP_REASONS[int(code)]
            dropped[reason] = dropped.get(reason, 0) + int(((status == DROPPED) & (codes == code)).sum())
        kept = np.flatnonzero(status == KEPT)
        example_status = np.where(status == DROPPED, cols["code"].to_numpy(zero_copy_only=False), 0).astype(np.int8)
        example_status[status == TEMPLATE_BAD] = -1
        statuses.append(example_status[is_example])
        if len(kept) and summary.first_example is None:
            summary.first_example = cols["where"][int(kept[0])].as_py()
        ids = cols["ids"]
        offsets = ids.offsets.to_numpy()
        flat = ids.values.to_numpy()[offsets[0] : offsets[-1]]
        if len(flat) and flat.max() >= np.iinfo(writer.dtype).max:
            raise RuntimeError(f"token id {int(flat.max())} does not fit the store's {writer.dtype}")
        lens = {k: cols[k].to_numpy(zero_copy_only=False)[kept] for k in ("prompt_len", "chosen_len", "rejected_len", "common_len")}
        writer.add_flat(flat, lens["prompt_len"], lens["chosen_len"], lens["rejected_len"], lens["common_len"], positions[kept])
        order += len(status)
    summary.examples = position
    summary.bad, summary.dropped = bad, dropped
    summary.shapes = {name: int(n) for name, n in zip(SHAPES, shapes) if n}
    summary.notes = {k: v for k, v in report.notes.items() if v}
    return np.concatenate(statuses) if statuses else np.zeros(0, dtype=np.int8)


def _num_proc(requested: int | None, rows: int) -> int:
    if requested is not None:
        return max(1, requested)
    return min(os.cpu_count() or 1, 8) if rows >= AUTO_PROC_MIN_ROWS else 1


def _unwrap_generation_error(e: Exception):
    """datasets wraps errors raised inside a generator; surface our own one-line errors."""
    cause = e
    while cause is not None:
        if isinstance(cause, PreftuneError):
            raise cause from None
        cause = cause.__cause__ or cause.__context__
    raise e


@contextmanager
def _progress_bars(shown: bool):
    """``datasets``' progress bars on or off for the block, then as they were (they are global)."""
    import datasets

    was_shown = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_shown else datasets.disable_progress_bars)()


def _build(folder: Path, name: str, split: str, location: SourceLocation, columns: ColumnMap, dataset_format: str,
           tokenizer, settings: TokenizeSettings, num_proc: int | None, hub_dataset, fingerprint: str) -> None:
    import datasets

    scratch = folder / "scratch"
    scratch.mkdir(parents=True)
    try:  # reading the rows into Arrow: no bar (its "Generating train split" names nothing the user chose)
        with _progress_bars(False):
            raw = datasets.Dataset.from_generator(
                _raw_rows, gen_kwargs={"name": name, "split": split, "location": location, "hub_dataset": hub_dataset},
                features=datasets.Features({k: datasets.Value("string") for k in ("where", "text", "reason", "detail")}),
                cache_dir=str(scratch / "raw"), fingerprint=f"raw{fingerprint[:32]}",
            )
    except Exception as e:  # noqa: BLE001 - re-raised below
        _unwrap_generation_error(e)
    procs = min(_num_proc(num_proc, len(raw)), max(len(raw), 1))
    with _progress_bars(len(raw) >= PROGRESS_MIN_ROWS and datasets.is_progress_bar_enabled()):
        mapped = raw.map(
            _tokenize_rows, batched=True, batch_size=500, num_proc=procs if procs > 1 else None,
            remove_columns=raw.column_names, features=_output_features(),
            fn_kwargs={"tokenizer": tokenizer, "columns": columns, "dataset_format": dataset_format, "mode": settings.chat_template,
                       "add_eos": settings.add_eos, "json_lines": location.is_json_lines},
            cache_file_name=str(scratch / "tokenized.arrow"), new_fingerprint=f"tok{fingerprint[:32]}", load_from_cache_file=False,
            desc=f"tokenizing {name}",
        )
    summary = SourceSummary(rows=len(raw))
    max_id = len(tokenizer) - 1 if tokenizer is not None else 0
    writer = PairStoreWriter(folder, max_id=max_id)
    status = _collect(_arrow_batches([f["filename"] for f in mapped.cache_files]), writer, summary)
    np.save(folder / STATUS_FILE, status)
    store = writer.finish(fingerprint)
    summary.pairs = len(store)
    (folder / "summary.json").write_text(json.dumps(summary.__dict__, indent=1))
    del raw, mapped
    shutil.rmtree(scratch, ignore_errors=True)


def tokenized_source(tokenizer, name: str, split: str = "train", columns: ColumnMap = ColumnMap(), dataset_format: str = "auto",
                     settings: TokenizeSettings | None = None, cache_dir: str | Path | None = None,
                     num_proc: int | None = None) -> TokenizedSource:
    """One source, tokenized by ``tokenizer`` (None: normalised only), from the cache or built.

    ``settings`` supplies the encoding settings (truncation is applied later, by the caller).
    """
    settings = settings or TokenizeSettings()
    started = time.perf_counter()
    location = resolve_source(name, split)
    hub_dataset = load_hub_dataset(name, split) if location.hub is not None else None
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    fingerprint = source_fingerprint(location, columns, dataset_format, tokenizer, settings, hub_dataset, memo_dir=root)
    entry = root / fingerprint
    from_cache = (entry / "summary.json").is_file()
    if not from_cache:
        tmp = root / f".tmp-{fingerprint[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise PreftuneError(f"cannot create the tokenized-data cache folder {str(root)!r}: {e.strerror or e} "
                                "(pass --dataset_cache_dir DIR to put it elsewhere)") from None
        try:
            _build(tmp, name, split, location, columns, dataset_format, tokenizer, settings, num_proc, hub_dataset, fingerprint)
            if entry.exists() and not (entry / "summary.json").is_file():  # damaged from outside: replace it
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.rename(tmp, entry)
            except OSError:  # another process finished the same entry first
                if not (entry / "summary.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = SourceSummary(**json.loads((entry / "summary.json").read_text()))
    store = PairStore.load(entry, fingerprint)
    status = np.load(entry / STATUS_FILE)
    seconds = time.perf_counter() - started
    logger.info("%s: %s %d pairs in %.1f s (%s)", name, "read cached tokenized" if from_cache else "tokenized", len(store), seconds, entry)
    return TokenizedSource(store, summary, status, fingerprint, from_cache, seconds)
