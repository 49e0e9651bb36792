"""From a collated batch to per-sequence log-probabilities: the one engine every method uses.

``sequence_logps(model, batch)`` runs the decoder once over the batch layout (see
:mod:`preftune.layout`), gathers the hidden states of the scored positions only and turns them
into per-token log-probs through the LM head in chunks (:mod:`preftune.logprobs`). It returns
per-sequence sums and counts, from which every loss takes what it needs: length-averaged
log-probs (ORPO, SimPO), summed log-probs (DPO, CPO) and the chosen NLL, all from the same
per-token values in one pass. On request it also returns WPO's per-sequence "aligned" sums
(``Σ_t log p(y_t) − log Σ_v p_v²``, no gradient), and a batch may weight completion tokens
(LD-DPO's ``score_weight``, see :mod:`preftune.layout`).

For model families whose logits are not simply ``lm_head(hidden)`` up to a known transform,
the engine falls back to the full model forward (all logits) with a one-line warning.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, TypeVar

import numpy as np
import torch
from torch import nn

from .hf_helpers import unwrap_model
from .logprobs import DEFAULT_CHUNK_SIZE, LogitTransform, chunk_rows, chunked_token_logps, log_sum_sq_probs

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["PLAIN_HEAD_MODEL_TYPES", "SequenceLogps", "TokenLogps", "resolve_lm_head", "sequence_logps", "token_logps", "reduce_sequence_logps", "score_pairs",
           "forward_scorer", "run_inside_wrapper", "LMHeadSpec"]

# Model types whose CausalLM forward is `transform(lm_head(decoder(...).last_hidden_state))`
# with the transform read from the config below. Checked against transformers 5.x sources.
PLAIN_HEAD_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "phi",
    "gemma", "gemma2", "gemma3_text", "cohere", "cohere2", "granite", "granitemoe", "olmo",
    "olmo2", "starcoder2", "stablelm", "gpt_neox", "gpt2", "smollm3", "glm", "helium",
}


@dataclass
class LMHeadSpec:
    decoder: nn.Module
    head: nn.Module
    transform: LogitTransform


@dataclass
class SequenceLogps:
    """Per-sequence statistics of one batch of ``B`` pairs. Shapes ``(B,)``.

    ``*_sum``: summed completion log-probs (each token times its ``score_weight`` when the batch
    has one: LD-DPO); ``*_count``: completion tokens; ``nll_sum``/``nll_count``: summed negative
    log-likelihood (unweighted) and token count of the chosen sequence (completion only, or
    prompt + completion when prompt tokens were scored). ``*_aligned_sum`` (only when asked
    for, no gradient): ``Σ_t log p(y_t) − log Σ_v p_v²`` over completion tokens, for WPO.
    For unpaired examples (KTO) "chosen" is the completion and "rejected" its KL completion.
    """

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_count: torch.Tensor
    rejected_count: torch.Tensor
    nll_sum: torch.Tensor
    nll_count: torch.Tensor
    aux_loss: torch.Tensor | None = None
    chosen_aligned_sum: torch.Tensor | None = None
    rejected_aligned_sum: torch.Tensor | None = None

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_count

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_count


def logit_transform_from_config(config) -> LogitTransform:
    """Read the logit post-processing of Gemma 2/3, Cohere and Granite from a model config."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


_warned_fallback: set[str] = set()


def resolve_lm_head(model: nn.Module) -> LMHeadSpec | None:
    """Return (decoder, LM head, transform) for the fast path, or None when it does not apply."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        if model_type not in _warned_fallback:
            _warned_fallback.add(str(model_type))
            logger.warning(
                "model type %r is not on the fast log-prob path; computing full logits instead (slower, more memory)",
                model_type,
            )
        return None
    head = inner.get_output_embeddings()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if head is None or decoder is None or decoder is inner:
        return None
    return LMHeadSpec(decoder=decoder, head=head, transform=logit_transform_from_config(config))


def _sliding_window_mask(config, mask: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` cut to the model's sliding window, or None when no layer slides or nothing is cut.

    transformers returns a custom 4-D mask as-is, so the window its own masks add (``key >
    query - window``, Mistral, Phi-3, Gemma 2/3, ...) must be added here. Distances are taken
    in position ids, which in the packed layout are each token's index in its padded sequence.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or position_ids is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if int(position_ids.max()) < window:
        return None  # every query-key distance is below the window
    band = mask.clone()
    for r in range(mask.shape[0]):  # key position > query position - window, one row at a time
        pos = position_ids[r]
        band[r, 0] &= pos[None, :] > (pos[:, None] - window)
    return band


def _dense_attention_mask(model: nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed batch's reference ``(R, 1, T, T)`` mask, converted for the model's kernel.

    SDPA takes the boolean mask; the eager path adds the mask to the scores, so it needs an
    additive float mask (a boolean one would be added as 0/1 and silently give wrong results).
    Models with sliding-window layers get the window applied; those that mix full and sliding
    layers (``config.layer_types``) get a dict keyed by layer type.
    """
    from .attention import base_implementation
    from .layout import dense_segment_mask

    mask = dense_segment_mask(batch)
    position_ids = batch["position_ids"]
    config = getattr(unwrap_model(model), "config", None)
    impl = getattr(config, "_attn_implementation", "sdpa")
    impl = base_implementation(impl) or impl  # a preftune_* kernel without a plan is its base kernel

    def convert(m: torch.Tensor) -> torch.Tensor:
        if impl == "eager":
            additive = torch.zeros(m.shape, dtype=dtype, device=m.device)
            return additive.masked_fill_(~m, torch.finfo(dtype).min)
        return m

    sliding = _sliding_window_mask(config, mask, position_ids)
    if sliding is None:
        return convert(mask)
    if getattr(config, "layer_types", None) is None:  # every layer slides (Mistral, Phi-3, Mixtral)
        return convert(sliding)
    return {"full_attention": convert(mask), "sliding_attention": convert(sliding)}


def attention_inputs(model: nn.Module, batch: dict, dtype: torch.dtype) -> dict:
    """The decoder's attention keyword arguments for ``batch``.

    * padded layout: its 2-D padding mask (transformers builds the causal mask);
    * packed layout on segment attention (:mod:`preftune.attention`): the batch's
      :class:`~preftune.attention.SegmentPlan` as ``preftune_segments`` and a placeholder mask
      (no ``(T, T)`` tensor anywhere);
    * packed layout on any other kernel: the dense reference mask.
    """
    if "segments" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    from .attention import SEGMENT_KWARG, SegmentPlan, prepared_mask_placeholder, uses_segment_attention

    if uses_segment_attention(getattr(unwrap_model(model), "config", None)):
        rows, t = batch["input_ids"].shape
        plan = SegmentPlan.from_segments(batch["segments"], rows, t, device=batch["input_ids"].device)
        return {"attention_mask": prepared_mask_placeholder(rows, batch["input_ids"].device), SEGMENT_KWARG: plan}
    return {"attention_mask": _dense_attention_mask(model, batch, dtype)}


def autocast_compute_dtype(device: torch.device) -> torch.dtype:
    """The matmul dtype of mixed precision when autocast is on for ``device``, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def _head_logps(spec: LMHeadSpec, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int, cache_mb: float = 0.0,
                with_log_sum_sq: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(S,)`` and, when asked for, ``log Σ_v p_v²`` ``(S,)`` (no gradient)."""
    head = spec.head
    # DeepSpeed ZeRO-3 partitions the weight (ds_id attribute); only calling the module gathers it.
    if type(head) is nn.Linear and not hasattr(head.weight, "ds_id"):
        out = chunked_token_logps(hidden, head.weight, targets, head.bias, spec.transform, chunk_size, cache_mb, with_log_sum_sq,
                                  compute_dtype=autocast_compute_dtype(hidden.device))
        return out if with_log_sum_sq else (out, None)
    # LoRA-wrapped or quantized head: call the module itself chunk by chunk, recomputing each
    # chunk's logits in the backward (activation checkpointing) to keep memory O(chunk x V).
    pieces, squares = [], []
    chunk_size = chunk_rows(chunk_size, head.out_features if hasattr(head, "out_features") else 0)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]

        def piece(h_, t_=t):
            logits = spec.transform.apply(head(h_).float())
            return logits.gather(1, t_[:, None]).squeeze(1) - torch.logsumexp(logits, -1)

        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(piece, h, use_reentrant=False))
        else:
            pieces.append(piece(h))
        if with_log_sum_sq:
            with torch.no_grad():
                squares.append(log_sum_sq_probs(spec.transform.apply(head(h).float())))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.cat(pieces) if pieces else empty
    return logps, ((torch.cat(squares) if squares else empty) if with_log_sum_sq else None)


def _router_aux_loss(model: nn.Module, router_logits, token_mask: torch.Tensor) -> torch.Tensor | None:
    """MoE load-balancing loss (Switch Transformer eq. 4) as transformers' Mixtral computes it."""
    if not router_logits:
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = unwrap_model(model).config
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", 2)
    return load_balancing_loss_func(router_logits, num_experts, top_k, token_mask.long())


# Distributed wrappers whose forward must run for gradients to be synchronised (DDP arms its
# all-reduce in forward) or parameters to be gathered (FSDP, DeepSpeed ZeRO-3).
_WRAPPER_CLASS_NAMES = {"DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine", "DataParallel"}

BatchContext = Callable[[dict], ContextManager] | None


class TokenLogps(NamedTuple):
    """Per scored token, ``(S,)`` float32: ``logps``; ``log_sum_sq`` (``log Σ_v p_v²``, no gradient,
    only when asked for); and the batch's MoE ``aux_loss`` (scalar, or None)."""

    logps: torch.Tensor
    aux_loss: torch.Tensor | None
    log_sum_sq: torch.Tensor | None = None


def run_inside_wrapper(model: nn.Module, compute: Callable[[nn.Module], T]) -> T:
    """``compute(inner)`` executed *inside* ``model.forward`` when ``model`` is a distributed wrapper.

    Why: the engine calls the decoder and LM head of the wrapped model directly (it never asks for
    full logits). Called outside the wrapper, DDP would not arm its gradient all-reduce and
    FSDP/ZeRO-3 would not gather parameters, so replicas would silently diverge. So, for one call,
    ``compute`` is installed as the wrapped module's ``forward`` (an instance attribute shadowing
    the class's) and the wrapper is called; the attribute is removed afterwards, even on error.
    This is the one place preftune replaces a ``forward``. For a plain model, ``compute(model)``.
    """
    inner = getattr(model, "module", None)
    if type(model).__name__ not in _WRAPPER_CLASS_NAMES or not isinstance(inner, nn.Module):
        return compute(model)

    def forward_for_one_call(*_args, **_kwargs):
        return compute(inner)

    inner.forward = forward_for_one_call
    try:
        return model()
    finally:
        del inner.forward


def token_logps(model: nn.Module, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE, cache_mb: float = 0.0,
                batch_context: BatchContext = None, with_log_sum_sq: bool = False) -> TokenLogps:
    """Per-token log-probs of the scored tokens (see :class:`TokenLogps`).

    ``batch_context(batch)``, when given, is entered around the decoder forward (a model's
    :class:`preftune.model_hooks.ModelHooks`; ReFT sets its prompt positions there). A
    distributed wrapper runs the computation inside its forward (:func:`run_inside_wrapper`).
    ``with_log_sum_sq``: also return ``log Σ_v p_v²`` per token (WPO).
    """
    return run_inside_wrapper(model, lambda inner: _token_logps_local(inner, batch, chunk_size, cache_mb, batch_context, with_log_sum_sq))


def _token_logps_local(model: nn.Module, batch: dict, chunk_size: int, cache_mb: float, batch_context: BatchContext,
                       with_log_sum_sq: bool = False) -> TokenLogps:
    config = getattr(unwrap_model(model), "config", None)
    want_router = bool(getattr(config, "output_router_logits", False))
    kwargs = dict(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,  # a KV cache makes some models ignore a custom 4-D mask
    )
    if want_router:
        kwargs["output_router_logits"] = True
    spec = resolve_lm_head(model)
    around_forward = batch_context(batch) if batch_context is not None else contextlib.nullcontext()
    if spec is not None:
        kwargs.update(attention_inputs(model, batch, spec.head.weight.dtype))
        # record_function labels cost ~1 us and name the engine's parts in a torch.profiler trace
        with around_forward, torch.profiler.record_function("preftune: decoder"):
            out = spec.decoder(**kwargs)
        hidden = out.last_hidden_state  # (R, T, H)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["score_index"])  # (S, H)
        with torch.profiler.record_function("preftune: lm head"):
            logps, log_sum_sq = _head_logps(spec, selected, batch["score_target"], chunk_size, cache_mb, with_log_sum_sq)
    else:
        kwargs.update(attention_inputs(model, batch, next(model.parameters()).dtype))
        with around_forward:
            out = model(**kwargs)
        logits = out.logits  # (R, T, V)
        selected = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["score_index"]).float()
        logps = selected.gather(1, batch["score_target"][:, None]).squeeze(1) - torch.logsumexp(selected, -1)
        log_sum_sq = log_sum_sq_probs(selected.detach()) if with_log_sum_sq else None
    aux = _router_aux_loss(model, getattr(out, "router_logits", None), batch["token_mask"]) if want_router else None
    return TokenLogps(logps, aux, log_sum_sq)


def reduce_sequence_logps(batch: dict, logps: torch.Tensor, aux_loss=None, log_sum_sq: torch.Tensor | None = None) -> SequenceLogps:
    """Sum per-token log-probs ``(S,)`` into per-sequence statistics ``(B,)`` via ``score_seq``.

    Completion sums weight each token by ``batch["score_weight"]`` when present (LD-DPO); the
    NLL and the WPO aligned sums (from ``log_sum_sq``, when given) are unweighted.
    """
    b = int(batch["num_pairs"])
    seq = batch["score_seq"]
    is_completion = batch["score_is_completion"]
    zeros = torch.zeros(2 * b, dtype=logps.dtype, device=logps.device)
    weighted = logps * batch["score_weight"].to(logps.dtype) if "score_weight" in batch else logps
    completion_sum = zeros.index_add(0, seq, torch.where(is_completion, weighted, torch.zeros_like(logps)))
    completion_count = zeros.detach().index_add(0, seq, is_completion.to(logps.dtype))
    # chosen NLL: every scored token of the chosen sequence (completion, plus prompt if scored)
    all_sum = zeros.index_add(0, seq, logps)
    all_count = zeros.detach().index_add(0, seq, torch.ones_like(logps))
    aligned = None
    if log_sum_sq is not None:
        per_token = torch.where(is_completion, logps.detach() - log_sum_sq, torch.zeros_like(logps))
        aligned = zeros.detach().index_add(0, seq, per_token)
    return SequenceLogps(
        chosen_sum=completion_sum[:b],
        rejected_sum=completion_sum[b:],
        chosen_count=completion_count[:b],
        rejected_count=completion_count[b:],
        nll_sum=-all_sum[:b],
        nll_count=all_count[:b],
        aux_loss=aux_loss,
        chosen_aligned_sum=aligned[:b] if aligned is not None else None,
        rejected_aligned_sum=aligned[b:] if aligned is not None else None,
    )


def sequence_logps(model: nn.Module, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE, cache_mb: float = 0.0,
                   batch_context: BatchContext = None, with_aligned: bool = False) -> SequenceLogps:
    """Run ``model`` on a collated batch and return per-sequence log-prob statistics.

    ``cache_mb``: see :func:`preftune.logprobs.chunked_token_logps` (trade memory for one matmul).
    ``batch_context``: see :func:`token_logps`. ``with_aligned``: also return WPO's
    ``*_aligned_sum`` (one extra reduction per token).
    """
    out = token_logps(model, batch, chunk_size, cache_mb, batch_context, with_log_sum_sq=with_aligned)
    return reduce_sequence_logps(batch, out.logps, out.aux_loss, out.log_sum_sq)


def forward_scorer(model: nn.Module, batch_context: BatchContext = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Callable[[dict], SequenceLogps]:
    """``batch -> SequenceLogps`` of ``model`` (as it is: the caller chooses train/eval mode)."""
    return lambda batch: sequence_logps(model, batch, chunk_size=chunk_size, batch_context=batch_context)


@torch.no_grad()
def score_pairs(
    score_batch: Callable[[dict], SequenceLogps],
    pairs,
    pad_id: int,
    batch_size: int,
    device,
    *,
    layout: str = "packed",
    row_budget: int | None = None,
    score_prompt: bool = False,
    by_length: bool = False,
    tail_weight: float | None = None,
) -> SequenceLogps:
    """Forward-only :class:`SequenceLogps` of many pairs: ``score_batch`` on ``batch_size`` pairs at a time.

    The one forward-only scorer: evaluation, the demo's before/after table and the DPO reference
    precompute all come through here. ``by_length`` batches the pairs in order of length (denser
    rows); either way the fields come back in the order of ``pairs``, shapes ``(N,)``, float32 on
    the CPU. ``score_batch`` is e.g. :func:`forward_scorer` of a model. ``tail_weight``: LD-DPO's
    token weights (:func:`preftune.layout.collate_pairs`).
    """
    from .layout import batch_to, collate_pairs

    n, step = len(pairs), max(1, batch_size)
    if by_length:  # TokenizedPairs give their length array without building the pairs
        lengths = pairs.lengths() if hasattr(pairs, "lengths") else [p.packed_length for p in pairs]
        order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    else:
        order = list(range(n))
    columns = {f: torch.empty(n, dtype=torch.float32) for f in _SEQ_FIELDS}
    for start in range(0, n, step):
        idx = order[start : start + step]
        batch = collate_pairs([pairs[i] for i in idx], pad_id, layout, score_prompt=score_prompt, row_budget=row_budget, tail_weight=tail_weight)
        seq = score_batch(batch_to(batch, device))
        rows = torch.tensor(idx, dtype=torch.long)
        for f in _SEQ_FIELDS:
            columns[f][rows] = getattr(seq, f).detach().float().cpu()
    return SequenceLogps(**columns)


_SEQ_FIELDS = ("chosen_sum", "rejected_sum", "chosen_count", "rejected_count", "nll_sum", "nll_count")
