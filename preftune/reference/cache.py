"""The precomputed DPO reference: a table of reference log-probs keyed by example id, its
fingerprint, and its cache file under ``output_dir/ref_logps/``. See :mod:`preftune.reference`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.store import TokenizedPairs, as_tokenized_pairs
from ..engine import SequenceLogps, score_pairs
from ..errors import describe_exception
from ..hf_helpers import unwrap_model
from ..rundir import ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT", "PrecomputedReference", "compute_reference_table", "pairs_digest", "model_digest", "files_digest",
    "reference_fingerprint", "read_cache", "write_cache", "check_cache_file",
]

CACHE_FORMAT = "preftune-ref-logps-v1"  # part of every fingerprint: bump when the table's meaning changes


@dataclass
class PrecomputedReference:
    """Reference log-probs looked up by ``batch["example_ids"]``; tensors ``(N,)`` on the CPU.

    ``example_ids`` is sorted ascending; ``chosen``/``rejected`` are the summed completion
    log-probs of the reference (float32). ``cache_path`` is the file the table was read from or
    written to (None when it could not be written); ``from_cache`` says whether it was read.
    """

    example_ids: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    fingerprint: str
    description: str
    cache_path: Path | None = None
    from_cache: bool = False

    def __call__(self, policy: nn.Module | None, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["example_ids"]
        rows = self.rows(ids.detach().cpu())
        device = ids.device
        return self.chosen[rows].to(device), self.rejected[rows].to(device)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Table rows of ``ids`` ``(B,)``; a clear error for an id the table does not hold."""
        pos = torch.searchsorted(self.example_ids, ids).clamp(max=len(self.example_ids) - 1)
        missing = self.example_ids[pos] != ids
        if missing.any():
            bad = ids[missing].tolist()[:5]
            raise KeyError(
                f"example ids {bad} have no precomputed reference log-probs; the training data changed after the "
                "reference pass (rebuild the reference with build_reference on the current pairs)"
            )
        return pos


def _unique_pairs(pairs) -> TokenizedPairs:
    """One pair per example id, sorted by id; the same id with different tokens is an error (ids
    key the table). Works on the id array: only pairs whose id repeats are built and compared."""
    pairs = as_tokenized_pairs(pairs)
    ids = pairs.example_id
    order = np.argsort(ids, kind="stable")
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    for k in np.flatnonzero(~first):
        p, q = pairs[int(order[k])], pairs[int(order[k - 1])]
        if (q.prompt, q.chosen, q.rejected, q.label) != (p.prompt, p.chosen, p.rejected, p.label):
            raise ValueError(
                f"example id {p.example_id} names two different pairs; precomputed reference log-probs are keyed by "
                "example id, so train and eval pairs need distinct ids (preftune's loader offsets eval ids by 10**9)"
            )
    return pairs.subset(order[first])


def compute_reference_table(
    score_batch: Callable[[dict], SequenceLogps],
    pairs,
    pad_id: int,
    batch_size: int,
    device: torch.device | str,
    layout: str = "packed",
    row_budget: int | None = None,
    tail_weight: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward-only pass of the reference (``score_batch``, e.g. ``ModelReference.score``) over
    ``pairs`` (:class:`preftune.data.store.TokenizedPairs` or a list of PairTokens).

    Returns ``(example_ids, chosen, rejected)``, each ``(N,)``, sorted by example id (ids must be
    unique). Pairs are batched in order of length, ``batch_size`` per batch, so packed rows and
    padded rows stay dense (:func:`preftune.engine.score_pairs`). ``tail_weight``: LD-DPO's α
    (see :func:`preftune.layout.collate_pairs`). For unpaired examples (KTO) "chosen" is the
    completion and "rejected" the KL completion.
    """
    pairs = _unique_pairs(pairs)
    seq = score_pairs(score_batch, pairs, pad_id, batch_size, device, layout=layout, row_budget=row_budget, by_length=True,
                      tail_weight=tail_weight)
    ids = torch.from_numpy(pairs.example_id.copy())
    return ids, seq.chosen_sum, seq.rejected_sum


# --- fingerprint ----------------------------------------------------------------------------------
def pairs_digest(pairs) -> str:
    """sha256 naming the tokenized pairs (:meth:`preftune.data.store.TokenizedPairs.digest`:
    every example id and token, independent of order)."""
    return as_tokenized_pairs(pairs).digest()


def _tensor_sample_bytes(t: torch.Tensor, k: int) -> bytes:
    if t.device.type == "meta":
        return b"meta"
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    idx = torch.linspace(0, n - 1, min(n, k), dtype=torch.float64, device=flat.device).long().clamp_(0, n - 1)
    sample = flat.index_select(0, idx).cpu()
    sample = sample.double() if sample.is_floating_point() else sample.long()
    return sample.numpy().tobytes()


def _config_json(model: nn.Module) -> str:
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return ""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "use_cache"):
        d.pop(volatile, None)
    return json.dumps(d, sort_keys=True, default=str)


def model_digest(model: nn.Module, frozen_only: bool = False, samples: int = 256) -> str:
    """sha256 of the config and of ``samples`` evenly spaced values of every parameter.

    ``frozen_only``: skip trainable parameters (for a PEFT policy, whose frozen base is the
    reference while its adapters change). A sample, not every byte: any real change of weights
    (another checkpoint, a fine-tune) changes it; a single edited value may not.
    """
    h = hashlib.sha256(_config_json(model).encode())
    for name, p in model.named_parameters():
        if frozen_only and p.requires_grad:
            continue
        # the names a weight has with or without a PEFT wrapper: LoRA targets do not change the base
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(_tensor_sample_bytes(p, samples))
    return h.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_FILES = (MODEL_CONFIG_FILE, ADAPTER_CONFIG_FILE)


def files_digest(folder: Path, slice_bytes: int = 1 << 20) -> str:
    """sha256 of a model folder's configs and of size + three slices of every weight file."""
    h = hashlib.sha256()
    for child in sorted(folder.iterdir()):
        if not child.is_file():
            continue
        if child.name in _CONFIG_FILES:
            h.update(child.name.encode())
            h.update(child.read_bytes())
        elif child.name.endswith(_WEIGHT_SUFFIXES):
            size = child.stat().st_size
            h.update(f"{child.name}|{size}|".encode())
            with open(child, "rb") as f:
                for offset in sorted({0, max(0, size // 2 - slice_bytes // 2), max(0, size - slice_bytes)}):
                    f.seek(offset)
                    h.update(f.read(slice_bytes))
    return h.hexdigest()


def reference_fingerprint(model_identity: dict, pairs, engine: dict) -> str:
    """sha256 (hex) over the reference model's identity, the tokenized pairs and engine settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "model": model_identity, "engine": engine}, sort_keys=True, default=str).encode())
    h.update(pairs_digest(pairs).encode())
    return h.hexdigest()


# --- cache file ------------------------------------------------------------------------------------
CACHE_TENSORS = ("example_ids", "chosen", "rejected")


def _content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over the table's bytes, stored in the file's metadata: a flipped byte in a value is
    noticed on reading (the fingerprint only says which run the table is for, not that it is intact)."""
    from ..integrity import bytes_digest

    return bytes_digest(*(tensors[k].contiguous().numpy().tobytes() for k in CACHE_TENSORS))


def _load_cache_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in CACHE_TENSORS}


def check_cache_file(path: Path) -> str | None:
    """None if the cache file at ``path`` is intact (readable, its values match the digest written
    with them), else what is wrong. A damaged file is never used: training recomputes it."""
    try:
        meta, tensors = _load_cache_file(path)
    except Exception as e:  # a torn or foreign file
        return f"unreadable ({describe_exception(e, 120)})"
    if meta.get("content_xxh3_128") != _content_digest(tensors):
        return "its values do not match the digest written with them"
    return None


def read_cache(path: Path, fingerprint: str, want_ids: torch.Tensor):
    """The cached table, or None if absent, damaged, or not exactly for this fingerprint and these ids."""
    if not path.is_file():
        return None
    problem = check_cache_file(path)
    if problem is not None:
        logger.warning("reference cache %s is damaged (%s); recomputing it", path, problem)
        return None
    meta, tensors = _load_cache_file(path)
    ids, chosen, rejected = tensors["example_ids"], tensors["chosen"], tensors["rejected"]
    if meta.get("fingerprint") != fingerprint or not torch.equal(ids, want_ids) or chosen.shape != ids.shape \
            or rejected.shape != ids.shape or not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        logger.warning("reference cache %s does not match this run (stale or altered); recomputing it", path)
        return None
    return ids, chosen, rejected


def write_cache(path: Path, fingerprint: str, ids, chosen, rejected, description: str) -> bool:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"example_ids": ids.contiguous(), "chosen": chosen.contiguous(), "rejected": rejected.contiguous()}
        meta = {"fingerprint": fingerprint, "format": CACHE_FORMAT, "reference": description, "pairs": str(len(ids)),
                "content_xxh3_128": _content_digest(tensors)}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return True
    except OSError as e:
        logger.warning("could not write the reference cache %s (%s); continuing with the table in memory", path, e.strerror or e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


