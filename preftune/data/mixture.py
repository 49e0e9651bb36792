"""Dataset mixtures: several preference sources in one run, sampled deterministically.

A run's data is a list of :class:`DatasetSpec`. From the command line, ``--dataset_name A B C``
gives one spec per value (all rows of each, the top-level column/format flags). In a YAML run
file, ``datasets:`` gives each source its own settings::

    datasets:
      - path: data/ultrafeedback.jsonl        # file, save_to_disk folder or hub name ("name:" also works)
        weight: 2
      - path: data/domain.csv
        prompt_column: question               # column names, as the --*_column flags
        chosen_column: good
        rejected_column: bad
        num_samples: 5000
      - path: data/truthfulqa.csv
        format: truthfulqa                    # auto (default) or truthfulqa
        fraction: 0.5
        label: truthfulqa                     # how logs, run_config.json and the model card name it

``eval_datasets:`` is a second list of the same shape: the eval split as its own mixture.

How many examples each source gives (:func:`sample_counts`), with ``n_i`` its usable examples:

* no sampling key: all ``n_i``;
* ``num_samples: k``: ``k`` (more than ``n_i`` repeats the source: every example
  ``k // n_i`` times, then a sample of the remainder);
* ``fraction: f``: ``round(f * n_i)`` (``f > 1`` up-samples the same way);
* ``weight: w``: the weighted sources share one part of the mixture in proportion to their
  weights, as large as it can be without repeating an example:
  ``T = min_i(n_i * W / w_i)`` with ``W`` the sum of the weights, source ``i`` gives
  ``floor(T * w_i / W)``.

Which examples: a sample of ``k < n_i`` is the first ``k`` of a permutation seeded by
``(seed, source label)`` (numpy's ``RandomState``, whose stream is fixed across numpy
versions), kept in file order; so adding a source does not change another source's sample.
A single source with no sampling keeps file order; a mixture is shuffled once with ``seed``
so that ``--max_train_samples N`` takes a proportional slice. Counts are of examples (rows
after normalisation); pairs that tokenization or truncation drops are counted per source
afterwards.
"""

from __future__ import annotations

import difflib
import math
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import PreftuneError
from .formats import ColumnMap

__all__ = ["DatasetSpec", "parse_dataset_entries", "entries_with_absolute_paths", "sample_counts", "select_positions", "mixture_order", "SPEC_KEYS"]

SPEC_KEYS = ("path", "name", "split", "format", "prompt_column", "chosen_column", "rejected_column", "system_column",
             "tools_column", "weight", "num_samples", "fraction", "label")
SAMPLING_KEYS = ("weight", "num_samples", "fraction")


@dataclass(frozen=True)
class DatasetSpec:
    """One source of a mixture."""

    path: str
    split: str = "train"
    dataset_format: str = "auto"
    columns: ColumnMap = ColumnMap()
    weight: float | None = None
    num_samples: int | None = None
    fraction: float | None = None
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or self.path

    @property
    def sampling(self) -> str:
        if self.weight is not None:
            return f"weight {self.weight:g}"
        if self.num_samples is not None:
            return f"num_samples {self.num_samples}"
        if self.fraction is not None:
            return f"fraction {self.fraction:g}"
        return "all"

    @property
    def samples(self) -> bool:
        return self.weight is not None or self.num_samples is not None or self.fraction is not None


def _number(entry: dict, key: str, where: str, integer: bool = False):
    value = entry.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise PreftuneError(f"{where}: {key} must be {kind}, got {value!r}")
    return value


def parse_dataset_entries(entries, defaults: DatasetSpec, what: str = "datasets") -> list[DatasetSpec]:
    """Validate a YAML ``datasets:`` list into specs; missing keys come from ``defaults``."""
    from .convert import CONVERTERS

    if not isinstance(entries, list) or not entries:
        raise PreftuneError(f"{what} must be a non-empty list of entries like {{path: data.jsonl, weight: 1}}, got {entries!r}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{what} entry {i + 1} of {len(entries)}"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise PreftuneError(f"{where}: expected a mapping with a path (and optional split, columns, format, weight | num_samples | fraction), got {entry!r}")
        unknown = [k for k in entry if k not in SPEC_KEYS]
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(str(k), SPEC_KEYS, n=1)) else "") for k in unknown]
            raise PreftuneError(f"{where}: unknown key(s) {', '.join(hints)}; an entry takes {', '.join(SPEC_KEYS)}")
        ids = [entry[k] for k in ("path", "name") if entry.get(k) is not None]
        if len(ids) != 1 or not isinstance(ids[0], str) or not ids[0].strip():
            raise PreftuneError(f"{where}: give exactly one of path (a file or folder) or name (a hub dataset), as a string")
        given = [k for k in SAMPLING_KEYS if entry.get(k) is not None]
        if len(given) > 1:
            raise PreftuneError(f"{where}: give at most one of weight, num_samples, fraction (got {', '.join(given)})")
        fmt = entry.get("format", defaults.dataset_format)
        if fmt not in ("auto", *CONVERTERS):
            raise PreftuneError(f"{where}: format must be one of {', '.join(('auto', *CONVERTERS))}, got {fmt!r}")
        cols = {}
        for field in ("prompt", "chosen", "rejected", "system", "tools"):
            value = entry.get(f"{field}_column", getattr(defaults.columns, field))
            if not isinstance(value, str) or not value:
                raise PreftuneError(f"{where}: {field}_column must be a column name, got {value!r}")
            cols[field] = value
        split = entry.get("split", defaults.split)
        if not isinstance(split, str) or not split:
            raise PreftuneError(f"{where}: split must be a split name, got {split!r}")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise PreftuneError(f"{where}: label must be a string, got {label!r}")
        specs.append(DatasetSpec(
            path=ids[0], split=split, dataset_format=fmt, columns=ColumnMap(**cols),
            weight=_number(entry, "weight", where), num_samples=_number(entry, "num_samples", where, integer=True),
            fraction=_number(entry, "fraction", where), label=label,
        ))
    labels = [s.display for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise PreftuneError(f"{what}: {', '.join(map(repr, dupes))} appears twice; give the entries distinct label: values")
    return specs


def entries_with_absolute_paths(entries: list) -> list:
    """A ``datasets:`` list as a run records it: each local ``path:`` absolute
    (:func:`preftune.hub.local_path_or_name`), Hub names as they are. An entry whose path changes
    keeps its old path as its ``label:``, so the source's name in messages and records, and the seed
    of its sample (:func:`select_positions`), stay the same wherever the run is replayed from."""
    from ..hub import local_path_or_name

    out = []
    for entry in entries:
        entry = {"path": entry} if isinstance(entry, str) else entry
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str) and local_path_or_name(path) != path:
            entry = {**entry, "path": local_path_or_name(path)}
            entry.setdefault("label", path)
        out.append(entry)
    return out


def sample_counts(available: list[int], specs: list[DatasetSpec]) -> list[int]:
    """Examples each source gives (module docstring); ``available[i]`` = usable examples of source i."""
    counts = []
    for n, spec in zip(available, specs):
        if spec.num_samples is not None:
            counts.append(spec.num_samples)
        elif spec.fraction is not None:
            counts.append(int(round(spec.fraction * n)))
        else:
            counts.append(n)
    weighted = [i for i, s in enumerate(specs) if s.weight is not None]
    if weighted:
        total_w = sum(specs[i].weight for i in weighted)
        size = min(available[i] * total_w / specs[i].weight for i in weighted)
        for i in weighted:
            counts[i] = min(available[i], int(math.floor(size * specs[i].weight / total_w + 1e-9)))
    return counts


def _seed_for(seed: int, label: str) -> int:
    return zlib.crc32(f"{seed}:{label}".encode())


def select_positions(available: int, count: int, seed: int, label: str) -> np.ndarray:
    """``count`` example positions out of ``available`` (module docstring), sorted."""
    if count == available or available == 0:
        return np.arange(min(count, available), dtype=np.int64)
    repeats, rest = divmod(count, available)
    rng = np.random.RandomState(_seed_for(seed, label))
    sample = np.sort(rng.permutation(available)[:rest]).astype(np.int64)
    return np.concatenate([np.arange(available, dtype=np.int64)] * repeats + [sample])


def mixture_order(total: int, seed: int) -> np.ndarray:
    """The seeded order of a mixture's concatenated examples."""
    return np.random.RandomState(_seed_for(seed, "mixture order")).permutation(total).astype(np.int64)
