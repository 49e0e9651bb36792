"""Tokenized pairs in flat arrays: what a run trains on, without a Python list per pair.

:class:`PairStore` (one source, untruncated, usually a tokenized-cache entry on disk)::

    tokens            (T,)   uint16 when every id fits, else int32; pair i is
                             tokens[offsets[i] : offsets[i+1]] = prompt + chosen + rejected
    offsets           (N+1,) int64
    prompt_len, chosen_len, rejected_len, common_len   (N,) int32
                             common_len = longest common prefix of chosen and rejected
    position          (N,)   int64, the example's index among its source's examples
    label             (N,)   int8 or absent (-1 none, 0/1: room for unpaired, KTO-style rows)

On disk the tokens are read with ``os.pread`` (no memory map), so however long a run reads
them, they stay in the page cache and out of the process's RSS; the small per-pair arrays
(~30 bytes a pair, and as much again for a run's view of them) are loaded.

:class:`TokenizedPairs` (the training or eval set): a selection of rows of one or more stores,
each with its truncation applied (:func:`preftune.data.tokenize.plan_truncation`)::

    store_index (N,) int16, row (N,) int64, example_id (N,) int64,
    prompt_start, prompt_len, chosen_len, rejected_len (N,) int32   (after truncation)

``pairs[i]`` builds one :class:`preftune.layout.PairTokens` on demand; ``lengths()`` is the
packed length array every length-aware consumer (token-budget sampler, memory preflight,
reference precompute) reads instead of touching the pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..layout import PairTokens

__all__ = ["PairStore", "PairStoreWriter", "TokenizedPairs", "as_tokenized_pairs"]

_ARRAYS = ("offsets", "prompt_len", "chosen_len", "rejected_len", "common_len", "position")
TOKENS_FILE = "tokens.bin"


class _TokenFile:
    """Slices of a flat little-endian token file, read with ``pread`` (a memory map where the
    platform has no ``pread``). Re-opens after a fork or unpickling (DataLoader workers)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._fd, self._pid, self._map = None, None, None

    def __getstate__(self):
        return {"path": self.path, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__init__(state["path"], state["dtype"])

    def read(self, start: int, count: int) -> np.ndarray:
        if not hasattr(os, "pread"):  # pragma: no cover - Windows
            if self._map is None:
                self._map = np.memmap(self.path, dtype=self.dtype, mode="r")
            return np.asarray(self._map[start : start + count])
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        size = self.dtype.itemsize
        data = os.pread(self._fd, count * size, start * size)
        return np.frombuffer(data, dtype=self.dtype)

    def __del__(self):
        try:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down os already
            pass


class _TokenArray:
    """An in-memory token array with the same ``read`` as :class:`_TokenFile`."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.dtype = tokens.dtype

    def read(self, start: int, count: int) -> np.ndarray:
        return self.tokens[start : start + count]


def token_dtype(max_id: int) -> np.dtype:
    """uint16 when every id fits (half the bytes), else int32."""
    return np.dtype(np.uint16) if max_id < 2**16 else np.dtype(np.int32)


@dataclass
class PairStore:
    """Untruncated tokenized pairs of one source (see the module docstring)."""

    tokens: _TokenFile | _TokenArray
    offsets: np.ndarray
    prompt_len: np.ndarray
    chosen_len: np.ndarray
    rejected_len: np.ndarray
    common_len: np.ndarray
    position: np.ndarray
    key: str  # identifies the content: the cache fingerprint, or a hash of the arrays
    label: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.position)

    def pair_tokens(self, row: int) -> np.ndarray:
        """prompt + chosen + rejected ids of ``row``, untruncated."""
        start = int(self.offsets[row])
        return self.tokens.read(start, int(self.offsets[row + 1]) - start)

    def rows_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, found)``: the store row of each example position, and whether it has one
        (examples dropped at tokenization have none). ``position`` is sorted ascending."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = np.searchsorted(self.position, positions)
        rows = np.minimum(rows, max(len(self.position) - 1, 0))
        found = (self.position[rows] == positions) if len(self.position) else np.zeros(len(positions), dtype=bool)
        return rows, found

    @classmethod
    def from_lists(cls, prompts, chosens, rejecteds, commons, positions, labels=None) -> "PairStore":
        """An in-memory store from per-pair id lists (small sets, tests, the demo)."""
        writer = PairStoreWriter(None, max_id=max([max(x, default=0) for part in (prompts, chosens, rejecteds) for x in part], default=0))
        writer.add(prompts, chosens, rejecteds, commons, positions, labels)
        return writer.finish()

    @classmethod
    def load(cls, folder: Path, key: str) -> "PairStore":
        folder = Path(folder)
        meta = json.loads((folder / "store.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy") for name in _ARRAYS}
        label = np.load(folder / "label.npy") if meta.get("has_label") else None
        return cls(_TokenFile(folder / TOKENS_FILE, np.dtype(meta["token_dtype"])), **arrays, key=key, label=label)


class PairStoreWriter:
    """Appends batches of pairs to a store: on disk (``folder``, tokens streamed to a file, never
    all in memory) or in memory (``folder=None``)."""

    def __init__(self, folder: Path | None, max_id: int):
        self.folder = None if folder is None else Path(folder)
        self.dtype = token_dtype(max_id)
        self._file = None if folder is None else open(self.folder / TOKENS_FILE, "wb")
        self._tokens: list[np.ndarray] = []
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS[1:]}
        self._labels: list[np.ndarray] = []
        self._total = 0
        self._offsets = [np.zeros(1, dtype=np.int64)]

    def add(self, prompts, chosens, rejecteds, commons, positions, labels=None) -> None:
        lens = [np.fromiter((len(x) for x in part), dtype=np.int32, count=len(part)) for part in (prompts, chosens, rejecteds)]
        if not len(positions):
            return
        flat = np.fromiter(
            (t for p, c, r in zip(prompts, chosens, rejecteds) for part in (p, c, r) for t in part),
            dtype=self.dtype, count=int(sum(int(x.sum()) for x in lens)),
        )
        self.add_flat(flat, *lens, np.asarray(commons, dtype=np.int32), np.asarray(positions, dtype=np.int64), labels)

    def add_flat(self, flat: np.ndarray, prompt_len, chosen_len, rejected_len, common_len, positions, labels=None) -> None:
        """Append pairs whose tokens are already one flat array (pair by pair, prompt+chosen+rejected)."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        if self._file is not None:
            self._file.write(flat.tobytes())
        else:
            self._tokens.append(flat)
        sizes = prompt_len.astype(np.int64) + chosen_len + rejected_len
        self._offsets.append(self._total + np.cumsum(sizes))
        self._total += int(sizes.sum())
        for name, arr in (("prompt_len", prompt_len), ("chosen_len", chosen_len), ("rejected_len", rejected_len),
                          ("common_len", common_len), ("position", positions)):
            self._columns[name].append(np.asarray(arr))
        if labels is not None:
            self._labels.append(np.asarray(labels, dtype=np.int8))

    def finish(self, key: str | None = None) -> PairStore:
        arrays = {"offsets": np.concatenate(self._offsets).astype(np.int64)}
        for name, parts in self._columns.items():
            dtype = np.int64 if name == "position" else np.int32
            arrays[name] = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
        label = np.concatenate(self._labels) if self._labels else None
        if self._file is not None:
            self._file.close()
            for name, arr in arrays.items():
                np.save(self.folder / f"{name}.npy", arr)
            if label is not None:
                np.save(self.folder / "label.npy", label)
            (self.folder / "store.json").write_text(json.dumps({"token_dtype": self.dtype.name, "pairs": len(arrays["position"]),
                                                                 "tokens": self._total, "has_label": label is not None}))
            return PairStore.load(self.folder, key or "")
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, dtype=self.dtype)
        if key is None:
            h = hashlib.sha256(tokens.tobytes())
            for name in _ARRAYS:
                h.update(arrays[name].tobytes())
            key = h.hexdigest()
        return PairStore(_TokenArray(tokens), **arrays, key=key, label=label)


class TokenizedPairs(Sequence):
    """A run's pairs: rows of :class:`PairStore` s with their truncation (module docstring)."""

    def __init__(self, stores: list[PairStore], store_index, row, example_id, prompt_start, prompt_len, chosen_len, rejected_len):
        self.stores = list(stores)
        self.store_index = np.asarray(store_index, dtype=np.int16)
        self.row = np.asarray(row, dtype=np.int64)
        self.example_id = np.asarray(example_id, dtype=np.int64)
        self.prompt_start = np.asarray(prompt_start, dtype=np.int32)
        self.prompt_len = np.asarray(prompt_len, dtype=np.int32)
        self.chosen_len = np.asarray(chosen_len, dtype=np.int32)
        self.rejected_len = np.asarray(rejected_len, dtype=np.int32)

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, store: PairStore, rows, example_ids, plan=None) -> "TokenizedPairs":
        """``rows`` of ``store`` as pairs with ids ``example_ids``, cut by a
        :class:`preftune.data.tokenize.TruncationPlan` over those rows (None: untruncated)."""
        rows = np.asarray(rows, dtype=np.int64)
        if plan is None:
            start = np.zeros(len(rows), dtype=np.int32)
            p, c, r = store.prompt_len[rows], store.chosen_len[rows], store.rejected_len[rows]
        else:
            start, p, c, r = plan.prompt_start, plan.prompt_keep, plan.chosen_keep, plan.rejected_keep
        return cls([store], np.zeros(len(rows), dtype=np.int16), rows, example_ids, start, p, c, r)

    @classmethod
    def from_pairs(cls, pairs) -> "TokenizedPairs":
        """In-memory pairs from a list of :class:`PairTokens` (tests, the demo), in the list's
        order. The store holds them in example-id order, so the same pairs in another order
        have the same :meth:`digest`."""
        pairs = list(pairs)
        by_id = sorted(range(len(pairs)), key=lambda i: pairs[i].example_id)
        ordered = [pairs[i] for i in by_id]
        labels = None  # unpaired examples (KTO) keep their labels; -1: none
        if any(p.label is not None for p in ordered):
            labels = [-1 if p.label is None else int(p.label) for p in ordered]
        store = PairStore.from_lists([p.prompt for p in ordered], [p.chosen for p in ordered], [p.rejected for p in ordered],
                                     np.zeros(len(pairs), dtype=np.int32), np.arange(len(pairs)), labels)
        rows = np.empty(len(pairs), dtype=np.int64)
        rows[np.asarray(by_id, dtype=np.int64)] = np.arange(len(pairs))
        return cls.from_store(store, rows, [p.example_id for p in pairs])

    @classmethod
    def concat(cls, parts: list["TokenizedPairs"]) -> "TokenizedPairs":
        stores: list[PairStore] = []
        index_of: dict[int, int] = {}
        store_index = []
        for part in parts:
            for s in part.stores:
                if id(s) not in index_of:
                    index_of[id(s)] = len(stores)
                    stores.append(s)
            remap = np.array([index_of[id(s)] for s in part.stores] or [0], dtype=np.int16)
            store_index.append(remap[part.store_index])
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts] or [np.zeros(0)])  # noqa: E731
        return cls(stores, np.concatenate(store_index or [np.zeros(0)]), cat("row"), cat("example_id"),
                   cat("prompt_start"), cat("prompt_len"), cat("chosen_len"), cat("rejected_len"))

    def subset(self, indices) -> "TokenizedPairs":
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedPairs(self.stores, self.store_index[idx], self.row[idx], self.example_id[idx],
                              self.prompt_start[idx], self.prompt_len[idx], self.chosen_len[idx], self.rejected_len[idx])

    # --- reading -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._pair(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._pair(i)

    def _pair(self, i: int) -> PairTokens:
        store = self.stores[self.store_index[i]]
        r = int(self.row[i])
        full = store.pair_tokens(r)
        p_all, c_all = int(store.prompt_len[r]), int(store.chosen_len[r])
        s, p, c, rj = int(self.prompt_start[i]), int(self.prompt_len[i]), int(self.chosen_len[i]), int(self.rejected_len[i])
        label = None if store.label is None or store.label[r] < 0 else bool(store.label[r])
        return PairTokens(full[s : s + p].tolist(), full[p_all : p_all + c].tolist(),
                          full[p_all + c_all : p_all + c_all + rj].tolist(), int(self.example_id[i]), label=label)

    def lengths(self) -> np.ndarray:
        """Packed length ``|prompt| + |chosen| + |rejected|`` of every pair, ``(N,)`` int64."""
        return self.prompt_len.astype(np.int64) + self.chosen_len + self.rejected_len

    @property
    def labels(self) -> np.ndarray | None:
        """Per-pair int8 labels when every store has them (unpaired data), else None."""
        if not self.stores or any(s.label is None for s in self.stores):
            return None
        out = np.empty(len(self), dtype=np.int8)
        for k, s in enumerate(self.stores):
            sel = self.store_index == k
            out[sel] = s.label[self.row[sel]]
        return out

    def digest(self) -> str:
        """sha256 naming exactly these pairs: the stores' content keys and every per-pair array,
        in example-id order (so the order of the pairs does not matter)."""
        order = np.argsort(self.example_id, kind="stable")
        h = hashlib.sha256("|".join(s.key for s in self.stores).encode())
        for arr in (self.example_id, self.store_index, self.row, self.prompt_start, self.prompt_len, self.chosen_len, self.rejected_len):
            h.update(np.ascontiguousarray(arr[order]).tobytes())
        return h.hexdigest()


def as_tokenized_pairs(pairs) -> TokenizedPairs:
    """``pairs`` as :class:`TokenizedPairs` (a list of PairTokens is copied into flat arrays)."""
    return pairs if isinstance(pairs, TokenizedPairs) else TokenizedPairs.from_pairs(pairs or [])
