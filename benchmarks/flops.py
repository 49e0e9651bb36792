"""FLOPs per training step (counted from the token ids, not measured) and the machine's floor.

Three counts per step, each split into decoder ``layers``, LM ``head`` and ``attention``:

* ``useful``: the minimum for the maths. Decoder on every *distinct* token once (``|p|+|c|+|r|``:
  the prompt once), the LM head on scored tokens only, attention on the (query, key) pairs the
  model may attend (causal; rejected never sees chosen).
* ``preftune``: what the packed layout executes: rows as its collator packs them, padded to the
  longest row; the LM head on scored tokens, plus, for a trainable head, a recompute of the
  logits when the softmax does not fit ``--logprob_cache_mb`` (a frozen head recomputes
  nothing); attention as PyTorch's CPU flash kernel computes it (score blocks computed whole,
  see :func:`segment_pairs_executed`); the dense mask computes ``T^2`` per row.
* ``trl`` (padded): ``2B`` rows padded to the longest sequence, the LM head on every position,
  dense ``T x T`` attention.

FLOPs per token of a projection with ``n`` parameters: forward ``2n``; backward ``2n`` for the
input gradient plus ``2n`` for the weight gradient when the weight trains (full fine-tuning: 6n;
frozen base under LoRA: 4n, and the adapters ``6 n_lora``). Attention: ``4 hidden`` per pair
forward, ``8 hidden`` backward. A frozen reference (DPO) adds forwards.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

HEAD_RECOMPUTE = 2  # a chunked head that recomputes its logits in the backward adds one forward
PREFTUNE_CACHE_MB = 256.0  # PreftuneConfig.logprob_cache_mb default

Ids = tuple[list[int], list[int], list[int]]


def _tri(n: int) -> int:
    return n * (n + 1) // 2


def attended_pairs(p: int, c: int, r: int) -> int:
    """(query, key) pairs a segment may attend: causal ``[p, c]`` and ``r`` over ``[p, r]``."""
    return _tri(p + c) + r * p + _tri(r)


CPU_KV_BLOCK = 512  # PyTorch's CPU flash attention computes keys in blocks of 512


def cpu_causal_pairs(n: int) -> int:
    """(query, key) scores PyTorch's CPU flash kernel computes for a causal ``n x n`` run: each
    query block goes up to its last key, rounded up to whole 512-key blocks (so the full square
    up to 512 keys). Query blocks: 256 rows from 768 queries, 64 from 192, else 32."""
    q_block = 256 if n >= 768 else 64 if n >= 192 else 32
    total = 0
    for m in range(0, n, q_block):
        rows = min(q_block, n - m)
        total += rows * min(n, -(-(m + rows) // CPU_KV_BLOCK) * CPU_KV_BLOCK)
    return total


def segment_pairs_executed(p: int, c: int, r: int, block: int | None, uncut_above: int | None = None) -> int:
    """What segment attention computes on the CPU: the runs ``[p, c]`` (over ``[p, c]``) and
    ``r`` (over ``[p, r]``) cut into query blocks of ``block`` (``preftune.attention.
    CPU_QUERY_BLOCK``) unless they have more than ``uncut_above`` keys
    (``CPU_UNCUT_ABOVE_KEYS``); a block's first run is square (``is_causal``), the others are
    masked rectangles computed whole."""
    total = 0
    for q_len, shift in ((p + c, 0), (r, p)):
        step = q_len if not block or (uncut_above is not None and q_len + shift > uncut_above) else block
        for s in range(0, q_len, step):
            e = min(s + step, q_len)
            if shift == 0 and s == 0:
                total += cpu_causal_pairs(e)
            else:
                total += (e - s) * (shift + e)
    return total


def step_flops(pairs: list[Ids], params: dict, scored: Callable[[Ids], int], reference: bool, *, trainable_head: bool,
               trl_head_chunked: bool, attention: str = "segments", precision: str = "fp32") -> dict:
    """FLOPs of one training step on ``pairs`` (see the module docstring)."""
    from preftune.layout import choose_row_budget, pack_segments

    h, nl = params["hidden"], params["n_layers"]
    lora = params["lora"] > 0
    train_w = 4 if lora else 6  # decoder projections: frozen base under LoRA
    head_train = 6 if trainable_head else 4
    itemsize = 2 if precision == "bf16" else 4

    def tally(tokens, head_tokens, head_factor, ref_tokens, ref_head_tokens, attended, ref_attended):
        out = {
            "layers": train_w * params["layers"] * tokens + (6 * params["lora"] * tokens if lora else 0) + (2 * params["layers"] * ref_tokens if reference else 0),
            "head": head_factor * params["head"] * head_tokens + (2 * params["head"] * ref_head_tokens if reference else 0),
            "attention": 12 * h * attended * nl + (4 * h * ref_attended * nl if reference else 0),
        }
        out["total"] = sum(out.values())
        return out

    distinct = sum(len(p) + len(c) + len(r) for p, c, r in pairs)
    useful_pairs = sum(attended_pairs(len(p), len(c), len(r)) for p, c, r in pairs)
    completions = sum(len(c) + len(r) for _, c, r in pairs)
    n_scored = sum(scored(x) for x in pairs)
    useful = tally(distinct, n_scored, head_train, distinct, completions, useful_pairs, useful_pairs)

    seg = [len(p) + len(c) + len(r) for p, c, r in pairs]
    if attention == "segments":
        from preftune.attention import CPU_QUERY_BLOCK, CPU_UNCUT_ABOVE_KEYS

        budget = choose_row_budget(seg, 0.0)
        executed_pairs = sum(segment_pairs_executed(len(p), len(c), len(r), CPU_QUERY_BLOCK, CPU_UNCUT_ABOVE_KEYS) for p, c, r in pairs)
    else:
        from preftune.layout import attention_cost_for
        from types import SimpleNamespace

        cfg = SimpleNamespace(hidden_size=h, intermediate_size=params["intermediate"], num_attention_heads=params["heads"],
                              num_key_value_heads=params["kv"] // params["head_dim"])
        budget = choose_row_budget(seg, attention_cost_for(cfg))
    rows = pack_segments(seg, budget)  # what preftune's collator does by default
    t_row = max(sum(seg[i] for i in row) for row in rows)
    if attention != "segments":
        executed_pairs = len(rows) * t_row * t_row
    # a frozen head keeps d logp / d h from the forward (no recompute); a trainable one recomputes
    # its logits in the backward unless the softmax fits --logprob_cache_mb
    cached = not trainable_head or n_scored * params["vocab"] * itemsize <= PREFTUNE_CACHE_MB * 2**20
    packed = tally(len(rows) * t_row, n_scored, head_train + (0 if cached else HEAD_RECOMPUTE), len(rows) * t_row,
                   completions, executed_pairs, executed_pairs)

    t_pad = max(max(len(p) + len(c), len(p) + len(r)) for p, c, r in pairs)
    n_pad = 2 * len(pairs) * t_pad
    dense_pad = 2 * len(pairs) * t_pad * t_pad
    padded = tally(n_pad, n_pad, head_train + (HEAD_RECOMPUTE if trl_head_chunked else 0), n_pad, n_pad, dense_pad, dense_pad)
    return {"useful": useful, "preftune": packed, "trl": padded, "distinct_tokens": distinct, "packed_rows": len(rows),
            "packed_row_tokens": t_row, "padded_row_tokens": t_pad, "useful_attention_pairs": useful_pairs,
            "preftune_attention_pairs": executed_pairs}


def mean_step_flops(batches: list[list[Ids]], params: dict, scored, reference: bool, **kw) -> dict:
    """:func:`step_flops` averaged over steps 2..N (the steps the steady-state timing covers)."""
    per_step = [step_flops(b, params, scored, reference, **kw) for b in batches]
    use = per_step[1:] or per_step
    out = {}
    for kind in ("useful", "preftune", "trl"):
        out[kind] = {k: statistics.mean(s[kind][k] for s in use) for k in use[0][kind]}
    for k in ("distinct_tokens", "packed_rows", "packed_row_tokens", "padded_row_tokens", "useful_attention_pairs", "preftune_attention_pairs"):
        out[k] = statistics.mean(s[k] for s in use)
    return out


def floor_seconds(flops: dict, rates: dict) -> float:
    """Seconds for ``flops`` (split by class) at the measured GFLOP/s of each class."""
    return sum(flops[k] / (rates[k] * 1e9) for k in ("layers", "head", "attention"))


def matmul_rates(params: dict, tokens: int, run_tokens: int, dtype: str = "fp32", repeats: int = 5) -> dict:
    """Best-of-``repeats`` GFLOP/s of the model's matmul shapes in ``dtype``, by FLOP class.

    ``layers``: each projection's forward ``(M, d_in) x (d_in, d_out)``, input gradient
    ``(M, d_out) x (d_out, d_in)`` and weight gradient ``(d_in, M) x (M, d_out)`` at ``M`` tokens;
    ``head``: ``(chunk, H) x (H, V)`` and its two gradient products; ``attention``: the per-head
    ``(T, d) x (d, T)`` and ``(T, T) x (T, d)`` products at ``T = run_tokens``.
    """
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    h, inter, v, kv = params["hidden"], params["intermediate"], params["vocab"], params["kv"]
    heads, d = params["heads"], params["head_dim"]
    m, t = max(1, int(tokens)), max(1, int(run_tokens))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch_dtype)

    def mm_case(a_shape, b_shape):
        return (rnd(*a_shape), rnd(*b_shape)), 2 * a_shape[0] * a_shape[1] * b_shape[1], torch.mm

    def bmm_case(a_shape, b_shape):
        return (rnd(*a_shape), rnd(*b_shape)), 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2], torch.bmm

    projections = [(h, h), (h, kv), (h, inter), (inter, h)]
    layers = []
    for d_in, d_out in projections:
        layers += [mm_case((m, d_in), (d_in, d_out)), mm_case((m, d_out), (d_out, d_in)), mm_case((d_in, m), (m, d_out))]
    chunk = min(m, 1024)
    classes = {
        "layers": layers,
        "head": [mm_case((chunk, h), (h, v)), mm_case((chunk, v), (v, h)), mm_case((v, chunk), (chunk, h))],
        "attention": [bmm_case((heads, t, d), (heads, d, t)), bmm_case((heads, t, t), (heads, t, d))],
    }
    # rounds interleave the classes so a burst of load from elsewhere hits all of them alike
    rates = dict.fromkeys(classes, 0.0)
    for _ in range(repeats):
        for name, cases in classes.items():
            flops, secs = 0, 0.0
            for args, f, op in cases:
                op(*args)  # warm
                reps = max(1, int(2e8 // f))
                start = time.perf_counter()
                for _ in range(reps):
                    op(*args)
                secs += time.perf_counter() - start
                flops += f * reps
            rates[name] = max(rates[name], flops / secs / 1e9)
    return {"gflops": rates, "tokens": m, "run_tokens": t, "dtype": dtype, "threads": torch.get_num_threads()}
