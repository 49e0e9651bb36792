"""Reference log-probs for DPO: three ways to get ``log ref(y|x)`` without building gradients.

:func:`build_reference` returns a callable ``reference(policy, batch) -> (chosen_sum, rejected_sum)``
(two ``(B,)`` float32 tensors of **summed** completion log-probs on the batch's device) that
:class:`preftune.trainer.PreferenceTrainer` calls after the policy forward. Which one it builds:

1. **A separate frozen model** (:class:`ModelReference`). ``--ref_model_name_or_path`` is loaded
   with :func:`preftune.modeling.load_model` (same dtype and quantization as the policy); without
   it, a full fine-tune uses a deep copy of the *starting* policy. Eval mode,
   ``requires_grad=False``, run under ``torch.no_grad()``. Costs one more copy of the weights.
2. **The PEFT base with adapters disabled** (:class:`ModelReference` with ``adapters_off``). When
   the policy is a ``peft.PeftModel`` (LoRA, DoRA, QLoRA) and no ``--ref_model_name_or_path`` is
   given, the reference is the policy itself inside ``with model.disable_adapter():``, in eval
   mode. No second copy in memory; one extra forward per step.
3. **Precomputed** (:class:`PrecomputedReference`, ``--precompute_ref_log_probs``). Before
   training, one forward-only pass of the reference chosen by 1/2 over the train and eval pairs
   (the same engine: :func:`preftune.layout.collate_pairs` + :func:`preftune.engine.sequence_logps`,
   ``per_device_eval_batch_size`` pairs per batch) fills a table keyed by ``example_id``. Training
   then costs no reference forward and no reference weights (a separate reference model is
   released after the pass).

The precomputed table is cached at ``output_dir/ref_logps/<fingerprint>.safetensors``. The
fingerprint is a sha256 over (see :func:`reference_fingerprint`):

* the reference model's identity: its name/path and config, plus a sample of every weight tensor
  (an in-memory policy: 256 evenly spaced values of each frozen parameter) or of every weight
  file (a ``--ref_model_name_or_path`` folder: size and three 1 MiB slices of each file, so the
  cache is checked without loading the model);
* the tokenized pairs (:meth:`preftune.data.store.TokenizedPairs.digest`: the content keys of
  their stores, i.e. tokenized-cache fingerprints over data, tokenizer and chat template, plus
  every example id and truncated length; order-independent), which captures every tokenization
  setting (``max_length``, truncation, chat template, tokenizer);
* the engine settings that change the numbers: dtype, attention kernel, quantization, layout.

A later run with the same fingerprint (including ``--resume_from_checkpoint``, which rebuilds the
starting model before loading the checkpoint) reads the file instead of running the model. Any
change gives another file name, so a stale table is never read; a file whose stored fingerprint
or example ids do not match is recomputed and replaced. Files are written to a temporary name and
``os.replace``-d into place, so a reader never sees half a file.

Multi-process runs (DDP): every process loads the cache or, on a miss, computes the whole table
itself (no collective calls, so no barrier can time out during a long pass); only process 0
writes the file.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data.store import TokenizedPairs, as_tokenized_pairs
from .engine import _unwrap, sequence_logps
from .layout import batch_to, collate_pairs
from .rundir import ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE, REF_CACHE_DIR

logger = logging.getLogger(__name__)

__all__ = [
    "build_reference",
    "ModelReference",
    "PrecomputedReference",
    "compute_reference_table",
    "reference_fingerprint",
    "pairs_digest",
    "model_digest",
]

CACHE_FORMAT = "preftune-ref-logps-v1"  # part of every fingerprint: bump when the table's meaning changes

ReferenceFn = Callable[[nn.Module | None, dict], tuple[torch.Tensor, torch.Tensor]]


# --- on-the-fly references ----------------------------------------------------------------------
def _find_peft_model(model: nn.Module | None):
    """The ``peft.PeftModel`` inside DDP / torch.compile wrappers, or None."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    for _ in range(8):
        if model is None or isinstance(model, PeftModel):
            return model
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return None
    return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout) for the reference pass, then the caller's mode back."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _is_quantized_or_dispatched(model: nn.Module) -> bool:
    inner = _unwrap(model)
    return bool(
        getattr(inner, "is_loaded_in_4bit", False)
        or getattr(inner, "is_loaded_in_8bit", False)
        or getattr(inner, "is_quantized", False)
        or getattr(inner, "hf_device_map", None)
    )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _move_to(model: nn.Module, device: torch.device) -> None:
    """Put a reference model where the batches are (bitsandbytes / device_map models stay put)."""
    if _model_device(model) != device and not _is_quantized_or_dispatched(model):
        model.to(device)


class ModelReference:
    """On-the-fly reference: a forward-only pass of a frozen model for every batch.

    Args:
        model: the frozen reference model, or (``adapters_off=True``) the ``PeftModel`` policy.
        chunk_size: tokens per LM-head chunk (``--logprob_chunk_size``).
        description: one line naming the reference, for the log.
        adapters_off: run ``model`` (or the PeftModel found inside the ``policy`` the trainer
            passes, e.g. under DDP) with its adapters disabled.
        follow_batch_device: move ``model`` to the batch's device on first use (a separate
            model built before the Trainer moved the policy).
    """

    def __init__(self, model: nn.Module, chunk_size: int, description: str, adapters_off: bool = False,
                 follow_batch_device: bool = True):
        self.model = model
        self.chunk_size = chunk_size
        self.description = description
        self.adapters_off = adapters_off
        self.follow_batch_device = follow_batch_device

    def __call__(self, policy: nn.Module | None, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if self.adapters_off:
            model = _find_peft_model(policy) or self.model
        elif self.follow_batch_device:
            _move_to(model, batch["input_ids"].device)
        adapters = model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(model), adapters:
            seq = sequence_logps(model, batch, chunk_size=self.chunk_size)
        return seq.chosen_sum, seq.rejected_sum


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# --- precomputed reference ----------------------------------------------------------------------
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
        if (q.prompt, q.chosen, q.rejected) != (p.prompt, p.chosen, p.rejected):
            raise ValueError(
                f"example id {p.example_id} names two different pairs; precomputed reference log-probs are keyed by "
                "example id, so train and eval pairs need distinct ids (preftune's loader offsets eval ids by 10**9)"
            )
    return pairs.subset(order[first])


def compute_reference_table(
    reference: ReferenceFn,
    pairs,
    pad_id: int,
    batch_size: int,
    device: torch.device | str,
    layout: str = "packed",
    row_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward-only pass of ``reference`` over ``pairs`` (TokenizedPairs or a list).

    Returns ``(example_ids, chosen, rejected)``, each ``(N,)``, sorted by example id (ids must be
    unique). Pairs are batched in order of length, ``batch_size`` per batch, so packed rows and
    padded rows stay dense.
    """
    pairs = _unique_pairs(pairs)
    n = len(pairs)
    chosen = torch.empty(n, dtype=torch.float32)
    rejected = torch.empty(n, dtype=torch.float32)
    order = np.argsort(pairs.lengths(), kind="stable")  # by length, ties by id
    for start in range(0, n, max(1, batch_size)):
        idx = order[start : start + max(1, batch_size)]
        batch = collate_pairs([pairs[int(i)] for i in idx], pad_id, layout, score_prompt=False, row_budget=row_budget)
        batch = batch_to(batch, device)
        c, r = reference(None, batch)
        rows = torch.from_numpy(idx.astype(np.int64))
        chosen[rows] = c.detach().float().cpu()
        rejected[rows] = r.detach().float().cpu()
    ids = torch.from_numpy(pairs.example_id.copy())
    return ids, chosen, rejected


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
    config = getattr(_unwrap(model), "config", None)
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
def _read_cache(path: Path, fingerprint: str, want_ids: torch.Tensor):
    """The cached table, or None if absent, unreadable, or not exactly for this fingerprint and these ids."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("example_ids", "chosen", "rejected")}
    except Exception as e:  # a torn or foreign file: recompute
        logger.warning("reference cache %s is unreadable (%s); recomputing it", path, str(e).splitlines()[0][:120])
        return None
    ids, chosen, rejected = tensors["example_ids"], tensors["chosen"], tensors["rejected"]
    if meta.get("fingerprint") != fingerprint or not torch.equal(ids, want_ids) or chosen.shape != ids.shape \
            or rejected.shape != ids.shape or not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        logger.warning("reference cache %s does not match this run (stale or altered); recomputing it", path)
        return None
    return ids, chosen, rejected


def _write_cache(path: Path, fingerprint: str, ids, chosen, rejected, description: str) -> bool:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": fingerprint, "format": CACHE_FORMAT, "reference": description, "pairs": str(len(ids))}
        save_file({"example_ids": ids.contiguous(), "chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return True
    except OSError as e:
        logger.warning("could not write the reference cache %s (%s); continuing with the table in memory", path, e.strerror or e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


# --- choosing and building ---------------------------------------------------------------------------
def _engine_settings(args, choice, model_args) -> dict:
    return {
        "dtype": str(getattr(choice, "dtype", None)),
        "attn_implementation": getattr(choice, "attn_implementation", None),
        "layout": getattr(args, "batch_layout", "packed"),
        "load_in_4bit": bool(getattr(model_args, "load_in_4bit", False)),
        "load_in_8bit": bool(getattr(model_args, "load_in_8bit", False)),
        "bnb_4bit_quant_type": getattr(model_args, "bnb_4bit_quant_type", None),
        "use_bnb_nested_quant": getattr(model_args, "use_bnb_nested_quant", None),
    }


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _load_separate(path: str, model_args, choice) -> nn.Module:
    from .modeling import choose_device, load_model

    return _frozen(load_model(path, model_args, choice or choose_device()))


def _on_the_fly(model, model_args, args, choice) -> ModelReference:
    chunk = args.logprob_chunk_size
    if args.ref_model_name_or_path:
        ref = _load_separate(args.ref_model_name_or_path, model_args, choice)
        return ModelReference(ref, chunk, f"separate frozen model {args.ref_model_name_or_path!r}, on the fly")
    peft_model = _find_peft_model(model)
    if peft_model is not None:
        return ModelReference(peft_model, chunk, "the base model with adapters disabled (no second copy), on the fly",
                              adapters_off=True, follow_batch_device=False)
    return ModelReference(_frozen(copy.deepcopy(model)), chunk, "frozen copy of the starting policy, on the fly")


def _precomputed(model, model_args, args, choice, pairs: TokenizedPairs, tokenizer) -> PrecomputedReference:
    chunk = args.logprob_chunk_size
    ref_path = args.ref_model_name_or_path
    peft_model = _find_peft_model(model)
    if ref_path:
        folder = Path(ref_path).expanduser()
        loaded = None
        if folder.is_dir():
            identity = {"name": ref_path, "files": files_digest(folder)}
        else:  # a hub name: identify it by its weights
            loaded = _load_separate(ref_path, model_args, choice)
            identity = {"name": ref_path, "weights": model_digest(loaded)}
        what = f"separate model {ref_path!r}"
    else:
        name = getattr(model_args, "model_name_or_path", None) or "built-in demo model"
        # a PEFT base with adapters off and the same plain model are the same function: same identity
        identity = {"name": name, "weights": model_digest(model, frozen_only=peft_model is not None)}
        what = "the base model with adapters disabled" if peft_model is not None else "the starting policy"
    fingerprint = reference_fingerprint(identity, pairs, _engine_settings(args, choice, model_args))
    path = Path(args.output_dir).expanduser() / REF_CACHE_DIR / f"{fingerprint}.safetensors"
    want_ids = torch.from_numpy(np.unique(pairs.example_id))
    description = f"precomputed log-probs of {what}"

    cached = _read_cache(path, fingerprint, want_ids)
    if cached is not None:
        logger.info("DPO reference: %s, %d pairs, read from %s", description, len(want_ids), path)
        return PrecomputedReference(*cached, fingerprint=fingerprint, description=description, cache_path=path, from_cache=True)

    if ref_path:
        ref_model = loaded if loaded is not None else _load_separate(ref_path, model_args, choice)
        reference = ModelReference(ref_model, chunk, what, follow_batch_device=False)
    elif peft_model is not None:
        ref_model = peft_model
        reference = ModelReference(peft_model, chunk, what, adapters_off=True, follow_batch_device=False)
    else:
        ref_model = model  # before training the policy is the reference: no copy needed
        reference = ModelReference(model, chunk, what, follow_batch_device=False)
    device = getattr(args, "device", None) or _model_device(ref_model)
    _move_to(ref_model, torch.device(device))
    device = _model_device(ref_model)
    started = time.perf_counter()
    ids, chosen, rejected = compute_reference_table(
        reference, pairs, _pad_id(tokenizer), args.per_device_eval_batch_size, device, args.batch_layout, args.row_budget
    )
    seconds = time.perf_counter() - started
    written = getattr(args, "process_index", 0) == 0 and _write_cache(path, fingerprint, ids, chosen, rejected, description)
    logger.info("DPO reference: %s, %d pairs, computed in %.1f s%s", description, len(ids), seconds,
                f", cached at {path}" if written else "")
    # a separately loaded reference model goes out of scope (and memory) here
    return PrecomputedReference(ids, chosen, rejected, fingerprint, description, path if written else None, False)


def build_reference(model, model_args, args, choice, train_pairs, eval_pairs, tokenizer) -> ReferenceFn | None:
    """The DPO reference for this run: ``callable(policy, batch) -> (chosen_sum, rejected_sum)``.

    Call it before the Trainer is built and before a checkpoint is loaded: the default
    reference is the *starting* policy (see the module docstring for the three kinds).
    Returns None for methods that need no reference.
    """
    if not getattr(args, "needs_reference", args.method == "dpo"):
        return None
    if args.precompute_ref_log_probs:
        pairs = TokenizedPairs.concat([as_tokenized_pairs(train_pairs), as_tokenized_pairs(eval_pairs)])
        return _precomputed(model, model_args, args, choice, pairs, tokenizer)
    reference = _on_the_fly(model, model_args, args, choice)
    logger.info("DPO reference: %s", reference.description)
    return reference
