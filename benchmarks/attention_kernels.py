"""Which formulation of packed-segment attention is fastest on this machine (one process).

    python benchmarks/attention_kernels.py                  # fp32 and bf16, HH-sized and 4k-stacked segments

One attention layer of Qwen2-0.5B's shape (14 query heads, 2 key-value heads, head dim 64),
forward + backward, on a packed row of segments ``[prompt, chosen, rejected]``:

* ``dense mask``: one SDPA call over the row with the ``(T, T)`` boolean mask (the reference);
* ``per run, boolean mask``: SDPA per query run, ``is_causal`` for ``[prompt, chosen]``, a small
  lower-right boolean mask for the rejected queries, GQA in SDPA;
* ``per run, causal_lower_right``: the same with ``torch.nn.attention.bias.causal_lower_right``;
* ``per run, keys repeated``: the same with key/value heads repeated instead of ``enable_gqa``;
* ``preftune, query blocks of B``: the model's own kernel (``preftune_sdpa`` with a plan), runs cut
  into query blocks of ``B`` (``preftune.attention.CPU_QUERY_BLOCK``; PyTorch's CPU kernel
  computes a causal run's whole square up to 512 keys).

Every formulation's output is checked against the dense mask; median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS, KV_HEADS, DIM = 14, 2, 64
SEGMENTS = {
    "HH-sized (4 pairs)": [(120, 41, 50), (300, 80, 60), (60, 30, 90), (200, 120, 40)],
    "stacked 4k (2 pairs)": [(3900, 100, 90), (3800, 150, 120)],
}


def dense(q, k, v, segs):
    import torch

    t = q.shape[2]
    mask = torch.zeros(t, t, dtype=torch.bool)
    off = 0
    for p, c, r in segs:
        n = p + c + r
        block = torch.ones(n, n, dtype=torch.bool).tril_()
        block[p + c :, p : p + c] = False
        mask[off : off + n, off : off + n] = block
        off += n
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)


def per_run(mode):
    def run(q, k, v, segs):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention.bias import causal_lower_right

        if mode == "repeat":
            k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        gqa = mode != "repeat"
        outs, off = [], 0
        for p, c, r in segs:
            a = slice(off, off + p + c)
            outs.append(F.scaled_dot_product_attention(q[:, :, a], k[:, :, a], v[:, :, a], is_causal=True, enable_gqa=gqa))
            keys = torch.cat([torch.arange(off, off + p), torch.arange(off + p + c, off + p + c + r)])
            mask = causal_lower_right(r, p + r) if mode == "lower_right" else torch.ones(r, p + r, dtype=torch.bool).tril_(p)
            outs.append(F.scaled_dot_product_attention(q[:, :, off + p + c : off + p + c + r], k[:, :, keys], v[:, :, keys],
                                                       attn_mask=mask, enable_gqa=gqa))
            off += p + c + r
        return torch.cat(outs, dim=2)

    return run


def preftune_kernel(block, uncut_above=None):
    def run(q, k, v, segs):
        import torch

        from preftune import attention

        attention.register_segment_attention()
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        offsets, off = [], 0
        for p, c, r in segs:
            offsets.append((0, off, p, c, r))
            off += p + c + r
        plan = attention.SegmentPlan.from_segments(torch.tensor(offsets), 1, off)
        attention.CPU_QUERY_BLOCK, attention.CPU_UNCUT_ABOVE_KEYS = block, uncut_above
        module = torch.nn.Module()
        out, _ = ALL_ATTENTION_FUNCTIONS["preftune_sdpa"](module, q, k, v, None, scaling=DIM**-0.5, **{attention.SEGMENT_KWARG: plan})
        return out.transpose(1, 2)  # (1, H, T, D) like the others

    return run


FORMULATIONS = {
    "dense mask": dense,
    "per run, boolean mask": per_run("bool"),
    "per run, causal_lower_right": per_run("lower_right"),
    "per run, keys repeated": per_run("repeat"),
    **{f"preftune, query blocks of {b}": preftune_kernel(b) for b in (None, 256, 128, 64, 48, 32)},
    "preftune default: blocks of 64, runs over 1,024 keys uncut": preftune_kernel(64, 1024),
}


def measure(fn, segs, dtype, repeats):
    import torch

    t = sum(sum(s) for s in segs)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, t, DIM, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, KV_HEADS, t, DIM, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, KV_HEADS, t, DIM, generator=g).to(dtype).requires_grad_()
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        out = fn(q, k, v, segs)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), out.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    ns = p.parse_args(argv)
    import torch

    import common

    torch.set_num_threads(ns.threads)
    rows = []
    for dname in ns.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        for sname, segs in SEGMENTS.items():
            base_time, base_out = measure(dense, segs, dtype, ns.repeats)
            for name, fn in FORMULATIONS.items():
                secs, out = (base_time, base_out) if fn is dense else measure(fn, segs, dtype, ns.repeats)
                err = (out.float() - base_out.float()).abs().max().item()
                rows.append([dname, sname, name, secs * 1e3, base_time / secs, f"{err:.1e}"])
                print(f"{dname} {sname} {name}: {secs * 1e3:.1f} ms", file=sys.stderr, flush=True)
    print(common.markdown_table(["dtype", "segments", "formulation", "fwd+bwd ms (median)", "speed-up vs dense", "max |diff| vs dense"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
