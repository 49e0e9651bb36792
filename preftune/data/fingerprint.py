"""The key of a tokenized-cache entry (:mod:`.cache`): a sha256 over a JSON object of

* ``CACHE_FORMAT`` and the source code of the modules that decide an entry's content (reading,
  normalising, converting, tokenizing, storing: :data:`CONTENT_MODULES`), so a changed rule never
  reads an old entry;
* the source: resolved path, split, ``--dataset_format``, column names, and the **content** of
  its files (xxh3-128 over every byte of the file, or of every file of a ``save_to_disk``
  folder; a hub dataset: the content fingerprint ``datasets`` gives it);
* the tokenizer: class, full serialized definition (vocabulary, merges, added tokens,
  normalizer, pre- and post-processors; the sorted vocabulary for slow tokenizers), its BOS,
  EOS and UNK tokens and its size (not the pad token: padding never enters the ids);
* the chat template text (preftune's default ChatML when the tokenizer has none);
* the settings that change ids before truncation: ``--chat_template`` mode and EOS appending.

Reading a million-pair file to hash it costs seconds, so a file's hash is remembered in
``<cache dir>/content-hashes.json`` under its resolved path together with its size, mtime,
ctime and inode, as git's index does: while all four are unchanged the hash is re-used. Any
write to the file changes its ctime (which no tool can set back), so an edit is always seen. A
hash recorded within :data:`RACY_SECONDS` of the file's mtime is not trusted (the file may have
been written again within the same clock tick).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .formats import ColumnMap
from .io import SourceLocation
from .tokenize import DEFAULT_CHAT_TEMPLATE, TokenizeSettings

__all__ = ["CACHE_FORMAT", "CONTENT_MODULES", "source_fingerprint", "tokenizer_digest", "file_content_hash"]

CACHE_FORMAT = "preftune-tokenized-v1"
CONTENT_MODULES = ("io.py", "formats.py", "convert.py", "tokenize.py", "store.py", "cache.py")
MEMO_FILE = "content-hashes.json"
RACY_SECONDS = 2.0


def _hash_files(paths: list[Path], root: Path | None = None) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_content_hash(path: Path, memo_dir: Path | None = None) -> str:
    """xxh3-128 of the file's bytes (and name), remembered by its stat (module docstring)."""
    path = Path(path).resolve()
    memo_path = None if memo_dir is None else Path(memo_dir) / MEMO_FILE
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):  # a damaged memo only costs a re-hash
            memo = {}
    stat = _stat_key(path)
    entry = memo.get(str(path))
    if entry and entry["stat"] == stat and entry["recorded"] - stat[1] / 1e9 > RACY_SECONDS:
        return entry["hash"]
    recorded = time.time()
    digest = _hash_files([path])
    if memo_path is not None and _stat_key(path) == stat:  # unchanged while we read it
        memo[str(path)] = {"stat": stat, "hash": digest, "recorded": recorded}
        tmp = memo_path.with_name(f".{MEMO_FILE}.{os.getpid()}.tmp")
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:  # a read-only cache folder: hash again next time
            pass
    return digest


def _content_key(location: SourceLocation, hub_dataset, memo_dir: Path | None) -> dict:
    if location.file is not None:
        return {"file": str(location.file.resolve()), "content": file_content_hash(location.file, memo_dir)}
    if location.folder is not None:
        files = sorted(p for p in location.folder.rglob("*") if p.is_file())
        return {"folder": str(location.folder.resolve()), "split": location.split, "content": _hash_files(files, location.folder)}
    return {"hub": location.hub, "split": location.split, "content": getattr(hub_dataset, "_fingerprint", None)}


def tokenizer_digest(tokenizer) -> str:
    """sha256 of everything about a tokenizer that can change an id (module docstring)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "unk_token", "bos_token_id", "eos_token_id", "unk_token_id")}
    special["size"] = len(tokenizer)
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in CONTENT_MODULES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def source_fingerprint(location: SourceLocation, columns: ColumnMap, dataset_format: str, tokenizer, settings: TokenizeSettings,
                       hub_dataset=None, memo_dir: Path | None = None) -> str:
    """The cache key of one source tokenized by ``tokenizer`` (None: normalised only)."""
    template = None
    if tokenizer is not None:
        template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    key = {
        "format": CACHE_FORMAT,
        "code": _code_digest(),
        "source": _content_key(location, hub_dataset, memo_dir),
        "dataset_format": dataset_format,
        "columns": [columns.prompt, columns.chosen, columns.rejected, columns.system, columns.tools],
        "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "chat_template": template,
        "encoding": settings.encoding_key(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
