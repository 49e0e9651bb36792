"""Reading preference tables from local files, saved datasets and (when reachable) the hub.

Every row comes back with a human-readable location (``data.jsonl line 7``, ``train.csv row 3``)
so that errors can point at it. Malformed JSON lines are returned as :class:`BadRecord` so that
``--on_bad_row skip`` can skip them like any other bad row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, PreftuneError

__all__ = ["Record", "BadRecord", "UNREADABLE_ROW_REASONS", "first_record", "read_records", "resolve_source", "SourceLocation", "parse_json_line", "iter_json_lines", "load_hub_dataset", "SUPPORTED_FILE_TYPES"]

SUPPORTED_FILE_TYPES = ".jsonl, .json, .csv, .tsv, .parquet (optionally .gz for text formats), or a datasets.save_to_disk folder"


@dataclass
class Record:
    row: dict[str, Any]
    where: str  # e.g. "data.jsonl line 7"


@dataclass
class BadRecord:
    where: str
    reason: str  # short reason key, e.g. "malformed JSON"
    detail: str


# BadRecord reasons of rows that could not be read as an object at all: they say nothing about
# the columns the other rows have.
UNREADABLE_ROW_REASONS = ("malformed JSON", "duplicate column", "not a JSON object", "malformed CSV", "wrong number of CSV fields")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise _DuplicateKey(", ".join(map(repr, dupes)))
    return dict(pairs)


def parse_json_line(line: str, where: str) -> Record | BadRecord | None:
    """One JSON-lines line as a row (None for a blank line); problems come back as BadRecord."""
    if not line.strip():
        return None
    # Without its line ending, so that a truncated line's error is at the column where it stops
    # (the decoder counts the newline as the start of a second line: "line 2 column 1").
    text = line.rstrip("\r\n")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        return BadRecord(where, "malformed JSON", f"{e.msg} at column {e.colno}")
    except _DuplicateKey as e:
        return BadRecord(where, "duplicate column", f"key(s) {e} appear twice in one object")
    if not isinstance(obj, dict):
        return BadRecord(where, "not a JSON object", f"got {type(obj).__name__}")
    return Record(obj, where)


def iter_json_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, raw line)`` of every non-blank line of a JSON-lines file, unparsed."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path.name} line {lineno}", line
    except UnicodeDecodeError as e:
        raise DataError(path.name, f"not valid UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(path.name, f"corrupt gzip file: {e}", "re-download or re-compress the file") from None


def _read_jsonl(path: Path) -> list[Record | BadRecord]:
    out = (parse_json_line(line, where) for where, line in iter_json_lines(path))
    return [r for r in out if r is not None]


def _read_json(path: Path) -> list[Record | BadRecord]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Many ".json" preference files are really JSON lines.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path)
        raise DataError(f"{path.name} line {e.lineno}", f"malformed JSON: {e.msg} at column {e.colno}",
                        "check the file is valid JSON or JSON lines") from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]} / column-oriented {"prompt": [...], ...}
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(x, dict) for x in next(iter(lists.values()))):
            data = next(iter(lists.values()))
        elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
        else:
            raise DataError(path.name, "expected a JSON array of row objects", "write one object per row, e.g. as JSON lines")
    if not isinstance(data, list):
        raise DataError(path.name, f"expected a JSON array of rows, found {type(data).__name__}", "write one object per row")
    out: list[Record | BadRecord] = []
    for i, obj in enumerate(data):
        where = f"{path.name} row {i}"
        if isinstance(obj, dict):
            out.append(Record(obj, where))
        else:
            out.append(BadRecord(where, "not a JSON object", f"got {type(obj).__name__}"))
    return out


def _read_csv(path: Path, delimiter: str) -> list[Record | BadRecord]:
    out: list[Record | BadRecord] = []
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return out
        except csv.Error as e:
            raise DataError(f"{path.name} line 1", f"malformed CSV header: {e}") from None
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path.name} line 1", f"duplicate column name(s) {', '.join(map(repr, dupes))}", "give every column a unique name")
        while True:
            start_line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                out.append(BadRecord(f"{path.name} line {start_line}", "malformed CSV", str(e)))
                continue
            where = f"{path.name} line {start_line}"
            if not values:
                continue
            if len(values) != len(header):
                out.append(BadRecord(where, "wrong number of CSV fields", f"expected {len(header)}, found {len(values)}"))
                continue
            out.append(Record(dict(zip(header, values)), where))
    return out


def _read_parquet(path: Path) -> list[Record | BadRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(path.name, f"cannot read Parquet file: {e}", "check the file is a valid Parquet file") from None
    return [Record(row, f"{path.name} row {i}") for i, row in enumerate(table.to_pylist())]


def _read_file(path: Path) -> list[Record | BadRecord]:
    kind = _base_suffix(path)
    try:
        if kind == ".jsonl":
            return _read_jsonl(path)
        if kind == ".json":
            return _read_json(path)
        if kind == ".csv":
            return _read_csv(path, ",")
        if kind == ".tsv":
            return _read_csv(path, "\t")
        if kind == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as e:
        raise DataError(path.name, f"not valid UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(path.name, f"corrupt gzip file: {e}", "re-download or re-compress the file") from None
    raise DataError(path.name, f"unsupported file type {kind or '(no extension)'!r}", f"use {SUPPORTED_FILE_TYPES}")


def _dataset_to_records(ds, label: str) -> list[Record]:
    return [Record(dict(row), f"{label} row {i}") for i, row in enumerate(ds)]


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(str(path), f"has no split {split!r} (splits: {', '.join(ds.keys())})", "pass --dataset_split with one of those")
        ds = ds[split]
    return _dataset_to_records(ds, f"{path.name}[{split}]")


def _split_file_in_folder(path: Path, split: str) -> Path | None:
    for child in sorted(path.iterdir()):
        name = child.name.lower()
        if child.is_file() and (name.startswith(split + ".") or name.startswith(split + "-")):
            return child
    return None


def load_hub_dataset(name: str, split: str):
    """``datasets.load_dataset(name, split=split)``, failing in one line when it cannot."""
    import datasets

    from ..hub import offline_mode

    if offline_mode():
        # datasets and huggingface_hub read their offline switches at import time: set the
        # module constants so only the local cache is consulted (no 30 s of retries).
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        if offline_mode():
            why = "the Hugging Face Hub is unreachable from this machine (or offline mode is on) and it is not in the local cache"
        else:
            why = "loading it from the Hugging Face Hub failed: " + (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        raise PreftuneError(
            f"dataset {name!r} is not a local file or folder, and {why}. "
            f"Download it on a machine with access (e.g. datasets' save_to_disk, or export JSON lines) and pass the local path: "
            f"{SUPPORTED_FILE_TYPES}."
        ) from None
    return ds


def _read_hub(name: str, split: str) -> list[Record]:
    return _dataset_to_records(load_hub_dataset(name, split), f"{name}[{split}]")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).suffix != "" or Path(name).suffix.lower() in {
        ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz"
    }


@dataclass(frozen=True)
class SourceLocation:
    """Where a dataset's rows come from: exactly one of a local ``file``, a ``save_to_disk``
    ``folder`` (with the ``split`` to pick), or a ``hub`` name (with its ``split``)."""

    file: Path | None = None
    folder: Path | None = None
    hub: str | None = None
    split: str = "train"

    @property
    def is_json_lines(self) -> bool:
        return self.file is not None and _base_suffix(self.file) == ".jsonl"


def resolve_source(name: str, split: str = "train") -> SourceLocation:
    """Find the data named ``name`` (see :func:`read_records`); raises DataError when absent."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return SourceLocation(folder=path, split=split)
        found = _split_file_in_folder(path, split)
        if found is None:
            raise DataError(str(path), f"folder has no data file for split {split!r}", f"add {split}.jsonl or pass a file path")
        return SourceLocation(file=found, split=split)
    if path.exists():
        if not os.access(path, os.R_OK):
            raise DataError(str(path), "file is not readable (permission denied)", "fix the file permissions")
        return SourceLocation(file=path, split=split)
    if looks_like_path(name):
        raise DataError(str(path), "file not found", "check the path")
    return SourceLocation(hub=name, split=split)


def read_records(name: str, split: str = "train") -> list[Record | BadRecord]:
    """Read every row of a dataset given as a file, a folder or a hub name.

    * file: by extension (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.gz`` text);
    * folder: a ``datasets.save_to_disk`` folder (``split`` picks from a DatasetDict), or a folder
      holding ``{split}.jsonl`` / ``{split}-00000.parquet`` style files;
    * anything else: a hub dataset name, loaded through ``datasets`` (fails with a clear message
      when the hub is unreachable).
    """
    source = resolve_source(name, split)
    if source.folder is not None:
        return _read_saved_dataset(source.folder, split)
    if source.file is not None:
        return _read_file(source.file)
    return _read_hub(name, split)


def first_record(name: str, split: str = "train") -> Record | None:
    """The first readable row of a dataset (see :func:`read_records`), or None; for messages
    about the whole dataset, such as the columns it has. A JSON-lines file is read only up to it."""
    source = resolve_source(name, split)
    if source.is_json_lines:
        rows = (parse_json_line(line, where) for where, line in iter_json_lines(source.file))
    else:
        rows = iter(read_records(name, split))
    return next((r for r in rows if isinstance(r, Record)), None)
