"""Segment attention: prefix sharing without a ``(T, T)`` mask.

A packed row holds segments ``[prompt, chosen, rejected]`` (see :mod:`preftune.layout`). The
attention of one segment with lengths ``(P, C, R)`` is two ordinary causal problems::

    A  queries [prompt, chosen]  (P + C)   over keys [prompt, chosen]    (P + C), causal
    B  queries [rejected]        (R)       over keys [prompt, rejected]  (P + R), causal aligned
                                                                          bottom-right (the prompt
                                                                          fully visible)

so no query ever computes a score against a key it may not see (a dense ``(T, T)`` mask over
the row computes all ``T^2`` and throws most away), nothing grows as ``T^2``, and pairs can share
a row for free. Positions in B's key sequence are contiguous (``0 .. P + R - 1``: rejected
position ids continue from the prompt), so a sliding window is a band in either problem.

The work of one batch is a :class:`SegmentPlan`: a list of *query runs* ``(row, q_start, q_len,
key ranges)``, built once per batch from ``batch["segments"]`` and handed to every layer as the
keyword argument ``preftune_segments`` (transformers passes unknown keyword arguments from the
decoder call through to the attention function). Kernels:

* CPU (no dropout, no soft-cap): :class:`_CPURunsAttention`, PyTorch's CPU flash kernel (what
  ``scaled_dot_product_attention`` runs on CPU) per query block, as one autograd node that
  writes every output into the ``(B, T, H, D)`` result and keeps only that, ``q``/``k``/``v``
  and one log-sum-exp per block for the backward.
* ``sdpa`` (any other case): one ``scaled_dot_product_attention`` call per query run:
  ``is_causal`` for A, a small ``(R, P + R)`` boolean lower-right mask for B; GQA through
  ``enable_gqa``. Soft-capped attention (Gemma 2) goes through the same runs in plain maths,
  since SDPA has no soft-cap.
* ``flash_attention_2`` (CUDA with the ``flash_attn`` package): one
  ``flash_attn_varlen_func`` call for the whole batch, with ``cu_seqlens_q != cu_seqlens_k``
  (bottom-right causal) and B's keys gathered by index.

The attention functions are registered with transformers' ``AttentionInterface`` under
``preftune_<base>`` (``preftune_sdpa``, ``preftune_eager``, ``preftune_flash_attention_2``),
with ``<base>``'s mask function, so a model set to one of them behaves exactly like ``<base>``
whenever it is called without a plan (generation, a plain forward): the segment kernels run only
inside the engine. See docs/engine.md.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "SEGMENT_KWARG", "SEGMENT_BASES", "SegmentPlan", "QueryRun", "register_segment_attention", "segment_implementation",
    "base_implementation", "uses_segment_attention", "prepared_mask_placeholder", "flash_attn_available", "NO_PLAN_MODEL_TYPES",
]

SEGMENT_KWARG = "preftune_segments"
_PREFIX = "preftune_"
SEGMENT_BASES = ("sdpa", "eager", "flash_attention_2")  # kernels segment attention runs over
# attention-changing keyword arguments of transformers' kernels that the segment kernels do not
# implement (attention sinks, additive position biases): refused rather than silently dropped.
# Everything else a model passes along (position_ids, use_cache, output_router_logits, ...)
# describes the call the plan replaces, or other modules.
_UNSUPPORTED_KWARGS = ("s_aux", "position_bias")


@dataclass(frozen=True)
class QueryRun:
    """Queries ``[q_start, q_start + q_len)`` of packed row ``row`` attending, causally aligned
    bottom-right, to the concatenation of the key ranges ``keys`` (``(start, stop)`` pairs of
    the same row). ``q_len == sum of key lengths`` for A runs, ``<`` for B runs."""

    row: int
    q_start: int
    q_len: int
    keys: tuple[tuple[int, int], ...]

    @property
    def k_len(self) -> int:
        return sum(b - a for a, b in self.keys)

    def block(self, start: int, stop: int) -> "QueryRun":
        """Queries ``[start, stop)`` of this run (offsets within it), attending bottom-right to the
        run's first ``k_len - q_len + stop`` keys: everything they may see, nothing later."""
        keys, n = [], self.k_len - self.q_len + stop
        for a, b in self.keys:
            if n <= 0:
                break
            keys.append((a, min(b, a + n)))
            n -= keys[-1][1] - a
        return QueryRun(self.row, self.q_start + start, stop - start, tuple(keys))


@dataclass
class SegmentPlan:
    """The attention work of one packed batch (``rows`` x ``row_len`` tokens).

    ``runs`` cover every real query exactly once; padding queries (row ends) are in no run and
    get a zero output. ``flat_*`` describe the same runs over the flattened ``rows * row_len``
    tokens for the varlen kernel (padding runs included there, attending to themselves).
    """

    rows: int
    row_len: int
    runs: list[QueryRun]
    device: torch.device
    _masks: dict = field(default_factory=dict, repr=False)
    _varlen: dict | None = field(default=None, repr=False)
    _blocks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_segments(cls, segments: torch.Tensor, rows: int, row_len: int, device=None) -> "SegmentPlan":
        """``segments`` ``(K, 5)``: ``(row, offset, prompt_len, chosen_len, rejected_len)`` per pair."""
        runs = []
        for row, off, n_p, n_c, n_r in segments.tolist():
            runs.append(QueryRun(row, off, n_p + n_c, ((off, off + n_p + n_c),)))
            if n_r:  # an unpaired example (KTO) has no rejected run
                runs.append(QueryRun(row, off + n_p + n_c, n_r, ((off, off + n_p), (off + n_p + n_c, off + n_p + n_c + n_r))))
        runs.sort(key=lambda u: (u.row, u.q_start))
        return cls(rows, row_len, runs, torch.device(device) if device is not None else segments.device)

    def blocks(self, block: int | None, uncut_above: int | None = None) -> list[QueryRun]:
        """The runs cut into query blocks of at most ``block`` queries (None: uncut); runs with
        more than ``uncut_above`` keys stay whole.

        Block ``[s, e)`` of a run attends, bottom-right, to the run's first ``k_len - q_len + e``
        keys: everything a query of the block may see, nothing a later block needs. A kernel that
        computes a run's whole ``(q_len, k_len)`` score block (a masked run; on CPU, a causal run
        up to 512 keys long too) then computes about ``L^2 / 2 + L * block / 2`` pairs for a run
        of ``L`` instead of ``L^2``.
        """
        if not block:
            return self.runs
        key = (block, uncut_above)
        if key not in self._blocks:
            out = []
            for u in self.runs:
                if uncut_above is not None and u.k_len > uncut_above:
                    out.append(u)
                    continue
                out += [u.block(s, min(s + block, u.q_len)) for s in range(0, u.q_len, block)]
            self._blocks[key] = out
        return self._blocks[key]

    def row_cuts(self, row: int, runs: list[QueryRun] | None = None) -> tuple[list[int], list[int]]:
        """Where row ``row`` is cut for the queries of ``runs`` (default: the plan's runs) and for
        their keys (every key range's ends), each from 0 to ``row_len``."""
        q_cuts, k_cuts = {0, self.row_len}, {0, self.row_len}
        for u in self.runs if runs is None else runs:
            if u.row == row:
                q_cuts |= {u.q_start, u.q_start + u.q_len}
                for a, b in u.keys:
                    k_cuts |= {a, b}
        return sorted(q_cuts), sorted(k_cuts)

    # --- what it costs ------------------------------------------------------------------------
    def attended_pairs(self, window: int | None = None) -> int:
        """(query, key) pairs the model may attend: the useful attention work of one head."""
        total = 0
        for u in self.runs:
            k = u.k_len
            for i in range(u.q_len):
                last = k - u.q_len + i  # bottom-right: query i sees keys 0 .. last
                first = 0 if window is None else max(0, last - window + 1)
                total += last - first + 1
        return total

    # --- masks for the per-run kernels ---------------------------------------------------------
    def run_mask(self, run: QueryRun, window: int | None) -> torch.Tensor | None:
        """Boolean ``(q_len, k_len)`` mask of ``run`` (True = attend), or None when plain
        top-left ``is_causal`` says the same (square run, window absent or not binding)."""
        q, k = run.q_len, run.k_len
        binding = window is not None and window < k
        if q == k and not binding:
            return None
        key = (q, k, window if binding else None)
        mask = self._masks.get(key)
        if mask is None:
            shift = k - q  # bottom-right alignment: query i sees keys <= i + shift
            mask = torch.ones(q, k, dtype=torch.bool, device=self.device).tril_(shift)
            if binding:
                mask.triu_(shift - window + 1)  # and keys > i + shift - window
            self._masks[key] = mask
        return mask

    def additive_run_mask(self, run: QueryRun, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """:meth:`run_mask` as the additive mask PyTorch's flash kernels take (0 where attended,
        ``-inf`` elsewhere) in ``dtype``; None where :meth:`run_mask` is None."""
        mask = self.run_mask(run, window)
        if mask is None:
            return None
        key = (run.q_len, run.k_len, window, dtype)
        additive = self._masks.get(key)
        if additive is None:
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._masks[key] = additive
        return additive

    # --- the varlen description ----------------------------------------------------------------
    def varlen(self) -> dict:
        """``cu_seqlens_q/k`` (int32), ``max_seqlen_q/k`` and ``kv_index`` (flat key token of each
        varlen key position) for one ``flash_attn_varlen_func`` call over all rows."""
        if self._varlen is not None:
            return self._varlen
        q_lens, k_lens, kv_index = [], [], []
        by_row: dict[int, list[QueryRun]] = {}
        for u in self.runs:
            by_row.setdefault(u.row, []).append(u)
        for r in range(self.rows):
            base = r * self.row_len
            end = 0
            for u in by_row.get(r, []):
                q_lens.append(u.q_len)
                k_lens.append(u.k_len)
                for a, b in u.keys:
                    kv_index.extend(range(base + a, base + b))
                end = u.q_start + u.q_len
            if end < self.row_len:  # padding attends to itself; its output is never read
                q_lens.append(self.row_len - end)
                k_lens.append(self.row_len - end)
                kv_index.extend(range(base + end, base + self.row_len))

        def cumulative(lengths):
            return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)

        self._varlen = {
            "cu_seqlens_q": cumulative(q_lens), "cu_seqlens_k": cumulative(k_lens),
            "max_seqlen_q": max(q_lens), "max_seqlen_k": max(k_lens),
            "kv_index": torch.tensor(kv_index, dtype=torch.long, device=self.device),
        }
        return self._varlen


def prepared_mask_placeholder(rows: int, device) -> torch.Tensor:
    """The ``attention_mask`` to pass with a plan: an empty ``(rows, 1, 0, 0)`` boolean tensor.

    transformers returns a 4-D mask as-is ("already prepared") instead of building a causal
    ``(T, T)`` one, and the segment kernels ignore it; any other kernel handed it by mistake fails
    on its shape instead of silently attending everywhere.
    """
    return torch.zeros(rows, 1, 0, 0, dtype=torch.bool, device=device)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
class _RowPieces:
    """One row of ``x`` ``(B, H, T, D)`` cut at ``cuts`` by a single ``torch.split``.

    Taking each run's tokens by slicing would make every run's backward write a zero-filled
    gradient of the whole row (and add them up): ``O(runs x T)`` per layer. The backward of one
    split is one concatenation of the pieces' gradients.
    """

    def __init__(self, x_row: torch.Tensor, cuts: list[int]):
        self.cuts = cuts
        self.pieces = dict(zip(cuts[:-1], torch.split(x_row, [b - a for a, b in zip(cuts, cuts[1:])], dim=2)))

    def take(self, ranges) -> torch.Tensor:
        """The concatenation of ``x[:, :, a:b]`` over ``ranges`` (each a union of pieces)."""
        parts = []
        for a, b in ranges:
            i = self.cuts.index(a)
            while self.cuts[i] < b:
                parts.append(self.pieces[self.cuts[i]])
                i += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _softcap_attention(q, k, v, mask, scaling, softcap, dropout, training):
    """Plain-maths attention of one run with Gemma 2's logit soft-cap ``c tanh(s / c)``."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril_(k_len - q_len)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


CPU_QUERY_BLOCK = 64
"""Query block of the per-run kernel on CPU (:meth:`SegmentPlan.blocks`): PyTorch's CPU flash
kernel computes a causal run's whole score square when it is at most 512 keys long, and a masked
run's whole rectangle. Blocks of 64 execute about 1.25x the useful (query, key) pairs on HH-sized
segments (32: 1.17x, 128: 1.44x, uncut 1.75x) and ran fastest here: fwd + bwd of one
Qwen2-0.5B-shaped layer on 4 HH-sized pairs, alternated in one process (``/tmp`` probe over
``benchmarks/attention_kernels.py``), 40.2 ms at 64 against 47.6 at 48 and 47.0 at 32; on the
tiny benchmark's 4 heads 24.6 against 26.7 and 27.8. Each call costs about 0.4 ms beyond its FLOPs
(buffers set up inside the kernel), more than smaller blocks save."""

CPU_UNCUT_ABOVE_KEYS = 1024
"""Runs with more keys than this are not cut on CPU: the kernel skips key blocks above the
diagonal by itself (in steps of 512 keys), so a long run wastes little uncut, and uncut ran
fastest on 4k-token segments (1,765 ms; blocks of 128: 2,033, of 64: 21% slower than 128)."""


def _runs_attention(module, query, key, value, plan: SegmentPlan, dropout, scaling, sliding_window, softcap):
    """Per-run attention on any device; returns ``(B, T, H, D)`` like transformers' kernels."""
    if query.device.type == "cpu" and softcap is None and not dropout:
        return _cpu_runs_attention(query, key, value, plan, scaling, sliding_window)
    rows, heads, t, dim = query.shape
    lower_right = query.device.type == "cuda" and sliding_window is None
    gqa = key.shape[1] != heads
    outputs = [[] for _ in range(rows)]
    filled = [0] * rows
    row_parts = {}
    split_rows = [x.split(1, dim=0) for x in (query, key, value)]  # one backward for all rows
    runs = plan.blocks(CPU_QUERY_BLOCK, CPU_UNCUT_ABOVE_KEYS) if query.device.type == "cpu" else plan.runs
    for run in runs:
        if run.row not in row_parts:
            q_cuts, k_cuts = plan.row_cuts(run.row, runs)
            row_parts[run.row] = [_RowPieces(split_rows[0][run.row], q_cuts), _RowPieces(split_rows[1][run.row], k_cuts),
                                  _RowPieces(split_rows[2][run.row], k_cuts)]
        q_row, k_row, v_row = row_parts[run.row]
        q = q_row.take([(run.q_start, run.q_start + run.q_len)])  # (1, H, q_len, D)
        k, v = k_row.take(run.keys), v_row.take(run.keys)  # (1, H_kv, k_len, D)
        mask = plan.run_mask(run, sliding_window)
        if softcap is not None:
            out = _softcap_attention(q, k, v, mask, scaling, softcap, dropout, module.training)
        else:
            causal = mask is None
            if not causal and lower_right and run.q_len < run.k_len:
                # CUDA: let SDPA pick its flash / efficient kernel for bottom-right causal
                from torch.nn.attention.bias import causal_lower_right

                mask, causal = causal_lower_right(run.q_len, run.k_len), False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=scaling, enable_gqa=gqa)
        if run.q_start > filled[run.row]:
            raise ValueError("segment plan has a gap between query runs")
        outputs[run.row].append(out[0].transpose(0, 1))  # (q_len, H, D)
        filled[run.row] = run.q_start + run.q_len
    pieces = []
    for r in range(rows):
        if filled[r] < t:  # padding at the row end: zero output, never scored
            outputs[r].append(query.new_zeros(t - filled[r], heads, dim))
        pieces += outputs[r]
    return torch.cat(pieces, dim=0).view(rows, t, heads, dim)  # one copy into the (B, T, H, D) layout


def _keys_of(x_row: torch.Tensor, keys: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``x_row[:, :, a:b]`` concatenated over the key ranges: a view for one range, a copy for two."""
    parts = [x_row[:, :, a:b] for a, b in keys]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class _CPURunsAttention(torch.autograd.Function):
    """Every query run of a batch through PyTorch's CPU flash-attention kernel, as one autograd node.

    The same kernel ``scaled_dot_product_attention`` picks on CPU
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), called per run
    directly, so each run's output and gradients are the bits SDPA would give. One node instead of
    SDPA's per run (and the slices, concatenations and transposes around each) keeps per-run
    overhead low enough to cut runs into small query blocks, and keeps less: the outputs are
    written into the one ``(B, T, H, D)`` tensor the next projection reads (saved once, not also
    per run), and the two-range keys of rejected runs are gathered again in the backward instead
    of being kept.

    Inputs: query ``(B, H, T, D)``, key/value ``(B, H_kv, T, D)`` (grouped-query attention is the
    kernel's own), ``runs`` (:class:`QueryRun`), ``masks`` (per run: None for top-left causal,
    else an additive ``(q_len, k_len)`` mask in the query's dtype), ``scaling``. Output
    ``(B, T, H, D)``; queries in no run (row-end padding) get zeros.
    """

    @staticmethod
    def forward(ctx, query, key, value, runs, masks, scaling):
        rows, heads, t, dim = query.shape
        out = query.new_zeros(rows, t, heads, dim)
        lses = []
        for run, mask in zip(runs, masks):
            r, s, e = run.row, run.q_start, run.q_start + run.q_len
            q = query[r : r + 1, :, s:e]
            k, v = _keys_of(key[r : r + 1], run.keys), _keys_of(value[r : r + 1], run.keys)
            o, lse = _FLASH_CPU(q, k, v, 0.0, mask is None, attn_mask=mask, scale=scaling)
            out[r, s:e].copy_(o[0].transpose(0, 1))
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.runs, ctx.masks, ctx.scaling = runs, masks, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *lses = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for run, mask, lse in zip(ctx.runs, ctx.masks, lses):
            r, s, e = run.row, run.q_start, run.q_start + run.q_len
            k, v = _keys_of(key[r : r + 1], run.keys), _keys_of(value[r : r + 1], run.keys)
            dq, dk, dv = _FLASH_CPU_BACKWARD(
                grad_out[r : r + 1, s:e].transpose(1, 2), query[r : r + 1, :, s:e], k, v, out[r : r + 1, s:e].transpose(1, 2), lse,
                0.0, mask is None, attn_mask=mask, scale=ctx.scaling,
            )
            grad_q[r : r + 1, :, s:e] = dq
            start = 0
            for a, b in run.keys:  # keys shared by runs (the prompt) add up
                grad_k[r : r + 1, :, a:b] += dk[:, :, start : start + b - a]
                grad_v[r : r + 1, :, a:b] += dv[:, :, start : start + b - a]
                start += b - a
        return grad_q, grad_k, grad_v, None, None, None


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_runs_attention(query, key, value, plan: SegmentPlan, scaling, sliding_window):
    """:class:`_CPURunsAttention` over the plan's CPU query blocks, with additive masks cached per plan.

    Under CPU autocast (bf16), q/k/v are rounded to the autocast dtype as SDPA would round them,
    but the kernel then runs in float32 on those values (an exact upcast) and its output is
    rounded to the autocast dtype. PyTorch's CPU flash kernel is slower in bf16 than in float32
    (one 300-token run of a Qwen2-0.5B layer in blocks of 64, forward + backward: 17.3 ms in bf16,
    10.0 ms in float32), and float32 accumulates the softmax more precisely. Measured on the
    Qwen2-0.5B-shaped LoRA ORPO step in bf16 (3 alternated runs each): 3.79 / 3.42 / 3.94 s/step
    against 4.07 / 4.60 / 4.20 with the bf16 kernel, the same peak RSS (4.94 GB).
    """
    dtype = None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype).float() for t in (query, key, value))
    elif not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"segment attention: query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    runs = plan.blocks(CPU_QUERY_BLOCK, CPU_UNCUT_ABOVE_KEYS)
    masks = [plan.additive_run_mask(run, sliding_window, query.dtype) for run in runs]
    out = _CPURunsAttention.apply(query, key, value, runs, masks, scaling)
    return out if dtype is None else out.to(dtype)


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package and a CUDA device are present."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _varlen_attention(module, query, key, value, plan: SegmentPlan, dropout, scaling, sliding_window, softcap):
    """One FlashAttention varlen call over every run of the batch; returns ``(B, T, H, D)``."""
    from flash_attn import flash_attn_varlen_func

    rows, heads, t, dim = query.shape
    meta = plan.varlen()
    q = query.transpose(1, 2).reshape(rows * t, heads, dim)
    k = key.transpose(1, 2).reshape(rows * t, key.shape[1], dim).index_select(0, meta["kv_index"])
    v = value.transpose(1, 2).reshape(rows * t, value.shape[1], dim).index_select(0, meta["kv_index"])
    out = flash_attn_varlen_func(
        q, k, v, meta["cu_seqlens_q"], meta["cu_seqlens_k"], meta["max_seqlen_q"], meta["max_seqlen_k"],
        dropout_p=dropout, softmax_scale=scaling, causal=True,  # causal with q_len < k_len is bottom-right
        window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1),
        softcap=softcap or 0.0,
    )
    return out.reshape(rows, t, heads, dim)


def _fallback(base: str):
    """The attention function ``base`` stands for when a call carries no plan."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]

    def eager(module, *args, **kwargs):
        # eager attention is defined per model family, next to the attention module
        return inspect.getmodule(type(module)).eager_attention_forward(module, *args, **kwargs)

    return eager


def _make_attention_forward(base: str):
    fallback = _fallback(base)
    use_varlen = base == "flash_attention_2"

    def segment_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                                  sliding_window=None, softcap=None, **kwargs):
        """transformers attention function: segment kernels when a :class:`SegmentPlan` is passed
        as ``preftune_segments``, else ``base``'s own function. Shapes: query ``(B, H, T, D)``,
        key/value ``(B, H_kv, T, D)``; returns ``((B, T, H, D), None)``."""
        plan = kwargs.pop(SEGMENT_KWARG, None)
        if plan is None:
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            sliding_window=sliding_window, softcap=softcap, **kwargs)
        unsupported = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
        if unsupported:
            raise NotImplementedError(f"segment attention does not implement {', '.join(unsupported)}; use --batch_layout padded")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        kernel = _varlen_attention if use_varlen and query.is_cuda else _runs_attention
        with torch.profiler.record_function("preftune: segment attention"):
            return kernel(module, query, key, value, plan, dropout, scaling, sliding_window, softcap), None

    segment_attention_forward.__name__ = f"preftune_{base}_attention_forward"
    return segment_attention_forward


def segment_implementation(base: str) -> str:
    """The registered name of segment attention over ``base`` (``sdpa`` -> ``preftune_sdpa``)."""
    if base not in SEGMENT_BASES:
        raise ValueError(f"segment attention runs over one of {', '.join(SEGMENT_BASES)}, not {base!r}")
    register_segment_attention()
    return _PREFIX + base


def base_implementation(name: str | None) -> str | None:
    """``preftune_sdpa`` -> ``sdpa``; None for names that are not segment attention."""
    if name and name.startswith(_PREFIX) and name[len(_PREFIX):] in SEGMENT_BASES:
        return name[len(_PREFIX):]
    return None


# Model types whose decoder layers do not pass keyword arguments on to their attention call
# (transformers 5.x), so no plan can reach the kernel: the engine gives them the dense reference
# mask instead, which a ``preftune_*`` kernel called without a plan hands to its base kernel.
NO_PLAN_MODEL_TYPES = frozenset({"stablelm"})


def uses_segment_attention(config) -> bool:
    """Whether a model with this config runs segment attention when given a plan."""
    if getattr(config, "model_type", None) in NO_PLAN_MODEL_TYPES:
        return False
    return base_implementation(getattr(config, "_attn_implementation", None)) is not None


_registered = False


def register_segment_attention() -> None:
    """Register ``preftune_<base>`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in SEGMENT_BASES:
        AttentionInterface.register(_PREFIX + base, _make_attention_forward(base))
        AttentionMaskInterface.register(_PREFIX + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
    _registered = True
