"""How segment attention's query blocks trade executed (query, key) pairs against time (one process).

    python benchmarks/attention_blocks.py                 # the ORPO benchmark's batches, tiny and Qwen2-0.5B heads

PyTorch's CPU flash kernel computes a causal run's whole score square up to 512 keys and a
masked run's whole rectangle, so preftune cuts each query run into blocks
(``preftune.attention.CPU_QUERY_BLOCK``), and block ``[s, e)`` of a run computes
``(e - s) x (keys before it + e)`` scores (``flops.segment_pairs_executed``). Smaller blocks
execute fewer pairs, but each block is one more kernel call. This script measures both on the
real packed batches of ``bench_orpo.py`` (first ``--pairs`` HH pairs, ``--batch_size`` per step,
packed as preftune's collator packs them), one attention layer, forward + backward, fp32:

* ``fixed B``: blocks of ``B`` queries, the last one shorter (preftune's rule, ``B`` = 64);
* ``balanced B``: the same number of blocks as ``fixed B``, of equal sizes (for a given number of
  blocks, equal sizes execute the fewest pairs: block ``i`` adds ``b_i^2 / 2`` to the useful
  ``L^2 / 2``);
* ``uncut``: one call per run.

Printed per strategy and head shape: executed / useful pairs, kernel calls per layer and step,
and the median time over ``--repeats`` rounds (strategies in a shuffled order each round).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEAD_SHAPES = {"tiny (4 heads, 4 kv)": (4, 4), "Qwen2-0.5B (14 heads, 2 kv)": (14, 2)}
DIM = 64


def fixed(block: int):
    return lambda n: [(s, min(s + block, n)) for s in range(0, n, block)]


def balanced(block: int):
    def cut(n):
        count = -(-n // block)
        size, extra = divmod(n, count)
        out, end = [], 0
        for i in range(count):
            start, end = end, end + size + (i < extra)
            out.append((start, end))
        return out

    return cut


def uncut(n):
    return [(0, n)]


STRATEGIES = {"fixed 64 (preftune)": fixed(64), "balanced 64": balanced(64), "fixed 32": fixed(32), "balanced 48": balanced(48),
              "fixed 96": fixed(96), "balanced 96": balanced(96), "uncut": uncut}


def make_plan(segments, rows, row_len, cut):
    """A :class:`preftune.attention.SegmentPlan` whose query blocks are cut by ``cut``."""
    import torch

    from preftune.attention import SegmentPlan

    class CutPlan(SegmentPlan):
        def blocks(self, block, uncut_above=None):
            if "cut" not in self._blocks:
                out = []
                for u in self.runs:
                    out += [u.block(s, e) for s, e in cut(u.q_len)]
                self._blocks["cut"] = out
            return self._blocks["cut"]

    base = SegmentPlan.from_segments(torch.tensor(segments), rows, row_len)
    return CutPlan(base.rows, base.row_len, base.runs, base.device)


def executed_pairs(plan) -> int:
    """Scores the CPU kernel computes for the plan's blocks: a square block (a run's first, causal)
    as ``flops.cpu_causal_pairs``, any other block as its whole rectangle."""
    import flops

    return sum(flops.cpu_causal_pairs(u.q_len) if u.q_len == u.k_len else u.q_len * u.k_len for u in plan.blocks(None))


def packed_batches(ids, batch_size):
    """``(segments, rows, row_len)`` per step, packed as the collator packs them."""
    from preftune.layout import choose_row_budget, pack_segments

    out = []
    for b in range(0, len(ids) - batch_size + 1, batch_size):
        pairs = ids[b : b + batch_size]
        lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
        rows = pack_segments(lengths, choose_row_budget(lengths, 0.0))
        segments = []
        for row_index, row in enumerate(rows):
            offset = 0
            for i in row:
                p, c, r = pairs[i]
                segments.append((row_index, offset, len(p), len(c), len(r)))
                offset += lengths[i]
        out.append((segments, len(rows), max(sum(lengths[i] for i in row) for row in rows)))
    return out


def time_layer(batches, cut, heads, kv_heads) -> float:
    """Seconds of forward + backward of one attention layer over every batch."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from preftune import attention

    attention.register_segment_attention()
    kernel = ALL_ATTENTION_FUNCTIONS["preftune_sdpa"]
    total = 0.0
    for segments, rows, row_len in batches:
        plan = make_plan(segments, rows, row_len, cut)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(rows, heads, row_len, DIM, generator=g).requires_grad_()
        k = torch.randn(rows, kv_heads, row_len, DIM, generator=g).requires_grad_()
        v = torch.randn(rows, kv_heads, row_len, DIM, generator=g).requires_grad_()
        start = time.perf_counter()
        out, _ = kernel(torch.nn.Module(), q, k, v, None, scaling=DIM**-0.5, **{attention.SEGMENT_KWARG: plan})
        out.sum().backward()
        total += time.perf_counter() - start
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated strategy names to run (default: all)")
    ns = p.parse_args(argv)
    strategies = STRATEGIES if not ns.only else {k: STRATEGIES[k] for k in ns.only.split(",")}
    import torch
    from transformers import AutoTokenizer

    import common
    import flops

    torch.set_num_threads(ns.threads)
    workload = common.build_workload(AutoTokenizer.from_pretrained(str(common.TOKENIZER_DIR)), ns.max_length, ns.pairs)
    batches = packed_batches(workload.ids, ns.batch_size)
    useful = sum(flops.attended_pairs(len(p), len(c), len(r)) for p, c, r in workload.ids[: len(batches) * ns.batch_size])
    counts = {}
    for name, cut in strategies.items():
        plans = [make_plan(s, r, t, cut) for s, r, t in batches]
        counts[name] = (sum(executed_pairs(x) for x in plans) / useful, sum(len(x.blocks(None)) for x in plans) / len(plans))
    rows = []
    for shape, (heads, kv_heads) in HEAD_SHAPES.items():
        times = {name: [] for name in strategies}
        for name, cut in strategies.items():  # warm-up round
            time_layer(batches, cut, heads, kv_heads)
        for round_index in range(ns.repeats):
            order = list(strategies)
            random.Random(round_index).shuffle(order)
            for name in order:
                times[name].append(time_layer(batches, strategies[name], heads, kv_heads))
        base = statistics.median(times[next(iter(strategies))])
        for name in strategies:
            ms = statistics.median(times[name]) * 1e3 / len(batches)
            rows.append([shape, name, f"{counts[name][0]:.3f}x", f"{counts[name][1]:.1f}", ms, f"{statistics.median(times[name]) / base:.2f}"])
            print(f"{shape} {name}: {ms:.2f} ms/step", file=sys.stderr, flush=True)
    print(f"{len(batches)} steps of {ns.batch_size} pairs (first {len(batches) * ns.batch_size} HH pairs, max_length {ns.max_length}), "
          f"fp32, {ns.threads} threads, median of {ns.repeats} rounds:\n")
    print(common.markdown_table(["heads", "blocks", "executed / useful pairs", "kernel calls per layer-step",
                                 "fwd+bwd ms per layer-step", f"time / {next(iter(strategies))}"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
