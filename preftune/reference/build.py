"""Which DPO reference a run gets, built before the Trainer (and before a checkpoint is loaded):
see :mod:`preftune.reference` for the three kinds."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.store import TokenizedPairs, as_tokenized_pairs
from ..hf_helpers import find_peft_model, pad_token_id
from ..hub import local_path_or_name
from ..rundir import REF_CACHE_DIR
from .cache import PrecomputedReference, compute_reference_table, files_digest, model_digest, read_cache, reference_fingerprint, write_cache
from .models import ModelReference, ReferenceFn, frozen, model_device, move_to

logger = logging.getLogger(__name__)

__all__ = ["build_reference"]


def _engine_settings(args, choice, model_args) -> dict:
    settings = {
        "dtype": str(getattr(choice, "dtype", None)),
        "attn_implementation": getattr(choice, "attn_implementation", None),
        "layout": getattr(args, "batch_layout", "packed"),
        "ld_alpha": getattr(args, "ld_alpha", None),  # LD-DPO weights the summed log-probs
        "load_in_4bit": bool(getattr(model_args, "load_in_4bit", False)),
        "load_in_8bit": bool(getattr(model_args, "load_in_8bit", False)),
        "bnb_4bit_quant_type": getattr(model_args, "bnb_4bit_quant_type", None),
        "use_bnb_nested_quant": getattr(model_args, "use_bnb_nested_quant", None),
    }
    precision = getattr(args, "precision_choice", None)
    if precision is not None and (precision.bf16 or precision.fp16):  # fp32 tables keep the fingerprints they had
        settings["mixed_precision"] = "bf16" if precision.bf16 else "fp16"
    return settings


def _run_precision(args, device_type: str):
    """The autocast of the run's mixed precision: the table holds the log-probs the policy's own
    forward computes at step 0 (DPO's rewards start at exactly 0), as the on-the-fly reference does."""
    precision = getattr(args, "precision_choice", None)
    return precision.autocast(device_type) if precision is not None else contextlib.nullcontext()


def _load_separate(path: str, model_args, choice) -> nn.Module:
    from ..training_model import choose_device, load_model

    return frozen(load_model(path, model_args, choice or choose_device()))


def _on_the_fly(model, model_args, args, choice) -> ModelReference:
    chunk = args.logprob_chunk_size
    if args.ref_model_name_or_path:
        ref = _load_separate(args.ref_model_name_or_path, model_args, choice)
        return ModelReference(ref, chunk, f"separate frozen model {args.ref_model_name_or_path!r}, on the fly")
    peft_model = find_peft_model(model)
    if peft_model is not None:
        return ModelReference(peft_model, chunk, "the base model with adapters disabled (no second copy), on the fly",
                              adapters_off=True, follow_batch_device=False)
    return ModelReference(frozen(copy.deepcopy(model)), chunk, "frozen copy of the starting policy, on the fly")


def _precomputed(model, model_args, args, choice, pairs: TokenizedPairs, tokenizer) -> PrecomputedReference:
    chunk = args.logprob_chunk_size
    ref_path = args.ref_model_name_or_path
    peft_model = find_peft_model(model)
    # a local model is named by its absolute path: a resume replays the run's recorded (absolute) paths
    if ref_path:
        folder = Path(ref_path).expanduser()
        loaded = None
        if folder.is_dir():
            identity = {"name": local_path_or_name(ref_path), "files": files_digest(folder)}
        else:  # a hub name: identify it by its weights
            loaded = _load_separate(ref_path, model_args, choice)
            identity = {"name": ref_path, "weights": model_digest(loaded)}
        what = f"separate model {ref_path!r}"
    else:
        name = getattr(model_args, "model_name_or_path", None)
        name = local_path_or_name(name) if name else "built-in demo model"
        # a PEFT base with adapters off and the same plain model are the same function: same identity
        identity = {"name": name, "weights": model_digest(model, frozen_only=peft_model is not None)}
        what = "the base model with adapters disabled" if peft_model is not None else "the starting policy"
    fingerprint = reference_fingerprint(identity, pairs, _engine_settings(args, choice, model_args))
    path = Path(args.output_dir).expanduser() / REF_CACHE_DIR / f"{fingerprint}.safetensors"
    want_ids = torch.from_numpy(np.unique(pairs.example_id))
    description = f"precomputed log-probs of {what}"

    cached = read_cache(path, fingerprint, want_ids)
    if cached is not None:
        logger.info("reference model: %s, %d pairs, read from %s", description, len(want_ids), path)
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
    device = getattr(args, "device", None) or model_device(ref_model)
    move_to(ref_model, torch.device(device))
    device = model_device(ref_model)
    started = time.perf_counter()
    with _run_precision(args, device.type):
        ids, chosen, rejected = compute_reference_table(
            reference.score, pairs, pad_token_id(tokenizer), args.per_device_eval_batch_size, device, args.batch_layout, args.row_budget,
            getattr(args, "ld_alpha", None),
        )
    seconds = time.perf_counter() - started
    written = getattr(args, "process_index", 0) == 0 and write_cache(path, fingerprint, ids, chosen, rejected, description)
    logger.info("reference model: %s, %d pairs, computed in %.1f s%s", description, len(ids), seconds,
                f", cached at {path}" if written else "")
    # a separately loaded reference model goes out of scope (and memory) here
    return PrecomputedReference(ids, chosen, rejected, fingerprint, description, path if written else None, False)


def build_reference(model, model_args, args, choice, train_pairs, eval_pairs, tokenizer) -> ReferenceFn | None:
    """The DPO reference for this run: ``callable(policy, batch) -> (chosen_sum, rejected_sum)``.

    Call it before the Trainer is built and before a checkpoint is loaded: the default
    reference is the *starting* policy (see the module docstring for the three kinds).
    Returns None for methods that need no reference.
    """
    from ..methods import get_method

    if not get_method(args.method).needs_reference:
        return None
    if args.precompute_ref_log_probs:
        pairs = TokenizedPairs.concat([as_tokenized_pairs(train_pairs), as_tokenized_pairs(eval_pairs)])
        return _precomputed(model, model_args, args, choice, pairs, tokenizer)
    reference = _on_the_fly(model, model_args, args, choice)
    logger.info("reference model: %s", reference.description)
    return reference
