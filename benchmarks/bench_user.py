"""User-sized benchmark: a Qwen2-0.5B-shaped model with LoRA, preftune vs TRL 1.16, one table per command.

    python benchmarks/bench_user.py --method orpo --precision fp32     # ORPO, fp32
    python benchmarks/bench_user.py --method dpo --precision bf16      # DPO, bf16 mixed precision (both tools)

Each row is a full comparison from ``bench_orpo.py`` / ``bench_dpo.py`` (fresh process per tool,
identical token ids, first-step agreement, counted FLOPs, measured matmul floor in the precision
used) on ``models.QWEN2_05B`` (random init, vocabulary 151,936, tied embeddings) with LoRA r=16
(alpha 32, no dropout) on every projection for both tools. Rows ``LENGTHxPAIRS``: real HH pairs
at max_length 1024 (``first``), and HH prompts stacked with earlier dialogues to fill 4096
(``stacked``). A tool whose RSS passes ``--memory_cap_gb`` is stopped and reported as out of
memory (with the step it reached). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dpo  # noqa: E402
import bench_orpo  # noqa: E402
import common  # noqa: E402

BENCHES = {"orpo": bench_orpo.BENCH, "dpo": bench_dpo.BENCH}
PARSERS = {"orpo": common.base_parser, "dpo": lambda d: bench_dpo.parser()}


def row_argv(ns, length: int, pairs_per_step: int) -> list[str]:
    """The per-row command line of bench_orpo.py / bench_dpo.py."""
    steps = ns.steps if length <= 2048 else ns.long_steps
    argv = ["--model", ns.model, "--lora_r", str(ns.lora_r), "--precision", ns.precision, "--max_length", str(length),
            "--batch_size", str(pairs_per_step), "--steps", str(steps), "--pairs", str(pairs_per_step * steps),
            "--select", "first" if length <= 2048 else "stacked", "--threads", str(ns.threads), "--lr", "1e-4",
            "--memory_cap_gb", str(ns.memory_cap_gb), "--which", ns.which, "--allocator", ns.allocator,
            "--selective_checkpointing", ns.selective_checkpointing, "--linear_kernel", ns.linear_kernel, "--repeats", str(ns.repeats)]
    if ns.model_dir:
        argv += ["--model_dir", ns.model_dir]
    return argv + ["--checkpoint_dtype", ns.checkpoint_dtype]


def summary_row(length: int, pairs_per_step: int, run: dict) -> list:
    p, t = run["summary"].get("preftune", {}), run["summary"].get("trl", {})

    def val(d, k):
        if "error" in d:
            return "OOM" if d.get("oom") else "failed"
        return d.get(k, float("nan"))

    def gb(d):
        v = val(d, "peak_rss_mb")
        if isinstance(v, str):
            return f"{v} (> {d.get('peak_rss_mb', float('nan')) / 1024:.1f} at step {d.get('steps_done', 0) + 1})" if v == "OOM" else v
        return v / 1024

    def ratio(a, b):
        return a / b if isinstance(a, float) and isinstance(b, float) and b else float("nan")

    floor = (run["floor"] or {}).get("floor_s_per_step", float("nan"))
    ps, ts = val(p, "s_per_step"), val(t, "s_per_step")
    loss = run["agreement"].get("loss")
    return [
        f"{length} ({run['workload'].selection})", pairs_per_step, round(run["flops"]["distinct_tokens"]),
        ts, ps, ratio(ts, ps), gb(t), gb(p), ratio(val(p, "peak_rss_mb"), val(t, "peak_rss_mb")),
        floor, ratio(ps, floor), ratio(ts, floor), f"{loss['rel_diff']:.1e}" if loss else "n/a",
    ]


HEADERS = ["max_length (pairs)", "pairs/step", "distinct tokens/step", "TRL s/step", "preftune s/step", "speed-up",
           "TRL peak RSS GB", "preftune peak RSS GB", "RSS preftune/TRL", "floor s/step", "preftune/floor", "TRL/floor",
           "first-step loss rel. diff"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=tuple(BENCHES), default="orpo")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rows", default="1024x2,1024x4,4096x4", help="comma-separated LENGTHxPAIRS_PER_STEP")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per tool at max_length <= 2048 (s/step: mean of steps 2..N)")
    p.add_argument("--long_steps", type=int, default=3, help="optimizer steps per tool at longer max_length")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--model", default="qwen2-0.5b", help="benchmarks/models.py name (tiny: a quick check of the harness)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run each tool this many times, alternating, and keep each tool's median run "
                   "(this machine's speed drifts by 10-30%% over minutes; alternating spreads the drift over both tools)")
    p.add_argument("--which", choices=("preftune", "trl", "both"), default="both")
    p.add_argument("--memory_cap_gb", type=float, default=20.0)
    p.add_argument("--allocator", choices=("system", "jemalloc", "tcmalloc"), default="system",
                   help="both tools' workers run on this malloc (see benchmarks/common.py worker_env)")
    common.add_preftune_engine_arguments(p)
    p.add_argument("--model_dir", default=None, help="create the model here once and reuse it (default: a temporary folder)")
    common.add_checkpoint_dtype_argument(p)
    p.add_argument("--out", default=None, help="write every row's raw results as JSON here")
    ns = p.parse_args(argv)

    bench = BENCHES[ns.method]
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-user-{ns.method}-"))
    ns.model_dir = ns.model_dir or str(tmp / "model")
    rows, raw, status = [], [], 0
    try:
        for item in ns.rows.split(","):
            length, pairs_per_step = (int(x) for x in item.lower().split("x"))
            row_ns = PARSERS[ns.method](f"{bench.name} row").parse_args(row_argv(ns, length, pairs_per_step))
            print(f"== {bench.name} {ns.precision}: max_length {length}, {pairs_per_step} pairs/step", file=sys.stderr, flush=True)
            run = common.run_benchmark(bench, row_ns, tmp)
            print(common.main_report(bench, row_ns, run["results"], run["summary"], run["agreement"], run["flops"], run["floor"], run["workload"]),
                  file=sys.stderr, flush=True)
            rows.append(summary_row(length, pairs_per_step, run))
            raw.append({"row": item, "settings": vars(row_ns), "workload": run["workload"].summary(), "flops": run["flops"],
                        "floor": run["floor"], "results": run["results"], "summary": run["summary"], "agreement": run["agreement"]})
            status |= int(common.failed(run))
        title = (f"## {bench.name}, {ns.model}, LoRA r={ns.lora_r} on every projection, {ns.precision}: "
                 f"preftune vs TRL {bench.trl_trainer}")
        print(title + "\n\n" + common.markdown_table(HEADERS, rows))
        if ns.out:
            Path(ns.out).write_text(json.dumps({"argv": sys.argv, "settings": vars(ns), "rows": raw}, indent=1, default=str))
        return status
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
