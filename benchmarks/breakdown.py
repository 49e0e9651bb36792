"""Where preftune's time and memory go on one workload (one process, preftune only).

    python benchmarks/breakdown.py --model qwen2-0.5b --lora_r 16 --batch_size 4 --max_length 1024
    python benchmarks/breakdown.py ... --precision bf16 --gradient_checkpointing

Trains ``--steps`` steps exactly as ``bench_orpo.py``'s preftune worker does (same model, pairs,
settings), measuring per step: wall time, user and kernel CPU time (kernel time is mostly page
faults: first touches of freshly allocated memory), minor page faults, RSS at the end and the
step's own peak RSS (``VmHWM``, reset before each step through ``/proc/self/clear_refs``; with
``--reuse_freed_memory``, on by default, RSS stays at the first step's peak, so later steps show
that). Step 1 holds the workload's longest pair and sets the process's peak. Then one more step
on the batch of step 1 runs under ``torch.profiler`` and an autograd saved-tensor census, giving

* time by class: decoder matmuls, decoder other ops (norms, rotary, activations, residuals,
  copies), attention (kernel and its gathers), LM head (forward and backward), optimizer, and
  the rest (loss, collation, Trainer and Python overhead: the wall time no op accounts for);
* memory by class: runtime (imports), weights, trainable parameters with their gradients and
  AdamW state, the activations autograd keeps for the backward (by module), the LM head's
  buffers, and what is left of the peak (temporaries and allocator slack).

Last, the batches of steps 2..N (what the benchmarks' s/step covers) run once more under the
profiler, and each class's time is split into its matmuls (attention: its kernel) and the rest,
against the floor the benchmarks use (each class's useful FLOPs at matmul rates measured in this
process right after): how far the matmuls are from their floor, and how much of the step is
work the floor does not count (elementwise ops, the optimizer, Python).

Prints Markdown tables; ``--out`` keeps the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import common  # noqa: E402
import models  # noqa: E402
from _census import OUTSIDE_MODULES, saved_tensor_census  # noqa: E402  (shared with tests/test_checkpointing.py)

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"}  # the last: --linear_kernel onednn
FLOOR_OPS = MATMUL_OPS | {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
"""The ops the floor stands for: matmuls, and attention's own kernel (CPU; the dense-mask path's SDPA as well)."""
FLOOR_CLASS = {"LM head (fwd + bwd)": "head", "decoder matmuls (fwd + bwd)": "layers", "attention (fwd + bwd)": "attention"}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss():
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def step_meter():
    """TrainerCallback measuring each step (see the module docstring)."""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.steps = []

        def _mark(self):
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return time.perf_counter(), ru.ru_utime, ru.ru_stime, ru.ru_minflt

        def on_step_begin(self, args, state, control, **kwargs):
            reset_peak_rss()
            self.start = self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._mark()
            self.steps.append({
                "wall_s": end[0] - self.start[0], "user_s": end[1] - self.start[1], "kernel_s": end[2] - self.start[2],
                "minor_faults": end[3] - self.start[3], "peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_mb": common.current_rss_mb(),
            })

    return StepMeter()


def heap_in_use_mb() -> tuple[float, float] | None:
    """glibc's ``(heap size, bytes in use)`` in MB (``mallinfo2``), or None off glibc / under a
    preloaded allocator (whose own heap glibc does not see)."""
    import ctypes

    if os.environ.get("LD_PRELOAD"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                                                   "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return (info.arena + info.hblkhd) / 2**20, (info.uordblks + info.hblkhd) / 2**20


def classify(event) -> str:
    names = []
    e = event
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    joined = " | ".join(names)
    if "ChunkedLinearLogProbs" in joined or "preftune: lm head" in joined:
        return "LM head (fwd + bwd)"
    if "scaled_dot_product" in joined or "ScaledDotProduct" in joined or "preftune: segment attention" in joined:
        return "attention (fwd + bwd)"
    if "Optimizer." in joined:
        return "optimizer"
    if event.name in MATMUL_OPS:
        return "decoder matmuls (fwd + bwd)"
    if "preftune: decoder" in joined or "evaluate_function" in joined:
        return "decoder other ops (fwd + bwd)"
    return "other ops"


def profile_step(trainer, batch) -> dict:
    """Seconds by class of one training step (forward, backward, optimizer) under torch.profiler,
    and the slowest ops outside the matmuls (self time)."""
    from torch.profiler import ProfilerActivity, profile

    model = trainer.model_wrapped
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    wall = time.perf_counter() - started
    by, ops = Counter(), Counter()
    for ev in prof.events():
        kind = classify(ev)
        by[kind] += ev.self_cpu_time_total / 1e6
        if kind == "decoder other ops (fwd + bwd)":
            ops[ev.name] += ev.self_cpu_time_total / 1e6
    accounted = sum(by.values())
    by["unaccounted (Python, Trainer, profiler)"] = max(wall - accounted, 0.0)
    return {"wall_s": wall, "seconds": dict(by), "other_ops": dict(ops.most_common(12))}


def profile_steady(trainer, batches: list, step_ids: list, params: dict, precision: str) -> dict:
    """The time over the floor, on the batches the benchmarks' s/step covers (steps 2..N).

    Runs each batch once more (forward, backward, optimizer step) under ``torch.profiler`` and
    splits every class's self time into matmuls (attention: its kernel; :data:`FLOOR_OPS`) and the rest; then measures
    the floor's matmul rates (``flops.matmul_rates``) in this process, so the matmuls' time and
    their floor (each class's useful FLOPs at its measured rate, ``flops.step_flops``) come from
    the same machine state. Seconds are per step, averaged over the batches."""
    import statistics

    import flops as flop_model
    from torch.profiler import ProfilerActivity, profile

    scored = lambda pair: len(pair[0]) - 1 + len(pair[1]) + len(pair[2])  # noqa: E731  (bench_orpo's nll_on_prompt)
    model = trainer.model_wrapped
    by, matmul = Counter(), Counter()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            trainer.training_step(model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
    wall = (time.perf_counter() - started) / len(batches)
    for ev in prof.events():
        kind = classify(ev)
        by[kind] += ev.self_cpu_time_total / 1e6 / len(batches)
        if ev.name in FLOOR_OPS:
            matmul[kind] += ev.self_cpu_time_total / 1e6 / len(batches)
    by["unaccounted (Python, Trainer, profiler)"] = max(wall - sum(by.values()), 0.0)
    work = [flop_model.step_flops(ids, params, scored, False, trainable_head=params["lora_r"] == 0, trl_head_chunked=False,
                                  precision=precision) for ids in step_ids]
    useful = {k: statistics.mean(w["useful"][k] for w in work) for k in ("layers", "head", "attention")}
    tokens = statistics.mean(w["distinct_tokens"] for w in work)
    run = statistics.mean(len(p) + len(c) for ids in step_ids for p, c, _ in ids)
    rates = flop_model.matmul_rates(params, round(tokens), round(run), precision)["gflops"]
    floor = {k: useful[k] / (rates[k] * 1e9) for k in useful}
    return {"wall_s": wall, "seconds": dict(by), "matmul_seconds": dict(matmul), "floor_seconds": floor, "gflops": rates,
            "useful_gflop": {k: v / 1e9 for k, v in useful.items()}, "tokens": tokens}


def over_floor_table(steady: dict) -> str:
    """:func:`profile_steady` as a table: per class, the time, its matmuls against their floor, the rest."""
    rows, total_floor = [], sum(steady["floor_seconds"].values())
    for kind, secs in sorted(steady["seconds"].items(), key=lambda kv: -kv[1]):
        mm = steady["matmul_seconds"].get(kind, 0.0)
        fl = steady["floor_seconds"].get(FLOOR_CLASS.get(kind, ""), None)
        rows.append([kind, secs, mm, "" if fl is None else fl, "" if not fl else f"{mm / fl:.2f}x", secs - mm,
                     f"{(secs - mm) / total_floor:.2f}"])
    mm_all = sum(steady["matmul_seconds"].values())
    rows.append(["**total**", steady["wall_s"], mm_all, total_floor, f"{mm_all / total_floor:.2f}x", steady["wall_s"] - mm_all,
                 f"{(steady['wall_s'] - mm_all) / total_floor:.2f}"])
    return common.markdown_table(["class", "s/step", "of which matmuls (attention: its kernel)", "their floor", "matmuls / floor", "the rest",
                                  "the rest / total floor"], rows)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=tuple(models.MODELS), default="qwen2-0.5b")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--method", choices=("orpo",), default="orpo")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--select", choices=("first", "stacked"), default="first")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="measured steps before the profiled one")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--attention", choices=("segments", "dense"), default="segments")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--chunk_size", type=int, default=0, help="--logprob_chunk_size (0: preftune's automatic choice)")
    p.add_argument("--cache_mb", type=float, default=256.0, help="--logprob_cache_mb")
    p.add_argument("--preflight", action="store_true")
    common.add_preftune_engine_arguments(p)
    p.add_argument("--keep_freed_memory", choices=("true", "false"), default="true", help="preftune's --reuse_freed_memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model_dir", default=None, help="reuse (or create) the benchmark model here")
    common.add_checkpoint_dtype_argument(p)
    p.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(ns.threads)
    from preftune.config import ModelArguments, PreftuneConfig
    from preftune.data.tokenize import TokenizeSettings, tokenize_examples
    from preftune.data.formats import PreferenceExample
    from preftune.training_model import DeviceChoice, apply_peft, choose_device, load_model, load_tokenizer
    from preftune.trainer import PreferenceTrainer

    rss_runtime = common.current_rss_mb()
    tmp = Path(tempfile.mkdtemp(prefix="breakdown-"))
    ns.model_dir = ns.model_dir or str(tmp / "model")
    model_dir = common.prepare_model(ns, tmp)
    tok = load_tokenizer(str(models.tokenizer_dir(model_dir)))
    workload = common.build_workload(tok, ns.max_length, ns.pairs, ns.select)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], None, f"pair {i}", i) for i, r in enumerate(workload.rows)]
    settings = TokenizeSettings(max_length=ns.max_length, max_prompt_length=None, truncation_mode="keep_end", chat_template="never")
    pairs, _ = tokenize_examples(tok, examples, settings)

    margs = ModelArguments(model_name_or_path=str(model_dir), torch_dtype="float32", use_peft=ns.lora_r > 0,
                           lora_r=max(ns.lora_r, 1), lora_alpha=2 * max(ns.lora_r, 1), lora_dropout=0.0)
    choice = choose_device("float32", "sdpa", "packed")
    if ns.attention == "dense":
        choice = DeviceChoice(choice.device, choice.dtype, "sdpa")
    model = load_model(str(model_dir), margs, choice)
    if ns.lora_r:
        model = apply_peft(model, margs, ns.gradient_checkpointing)
    with torch.no_grad():  # page the weights in, so "weights" is measured, not deferred to step 1
        for t in model.parameters():
            t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
    rss_weights = common.current_rss_mb()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    spec = {"tmp": str(tmp), "steps": ns.steps, "batch_size": ns.batch_size, "lr": 1e-5, "seed": ns.seed,
            "precision": ns.precision, "gradient_checkpointing": ns.gradient_checkpointing}
    args = PreftuneConfig(**common.training_kwargs(spec, "preftune"), memory_preflight=ns.preflight, method=ns.method, beta=0.1,
                          reuse_freed_memory=ns.keep_freed_memory == "true", selective_checkpointing=ns.selective_checkpointing,
                          linear_kernel=ns.linear_kernel, nll_on_prompt=True, logprob_chunk_size=ns.chunk_size, logprob_cache_mb=ns.cache_mb)
    meter = step_meter()
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, processing_class=tok, callbacks=[meter])
    rss_trainer = common.current_rss_mb()
    trainer.train()

    batch = trainer._prepare_inputs(trainer.data_collator(pairs[: ns.batch_size]))  # step 1's batch: the peak
    tokens = int(batch["num_tokens"])
    # When training ends the trainer drops the kept casts of frozen weights and gives weights held in
    # bf16 their float32 back (preftune.linear_kernel.release_cast_copies): one unmeasured step makes
    # them again, so the profiled step and the census see training's steady state, not the casts.
    trainer.training_step(trainer.model_wrapped, batch)
    trainer.optimizer.zero_grad()
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(x): x for x in [*model.parameters(), *model.buffers()]}.values())
    reset_peak_rss()
    profiled = profile_step(trainer, batch)
    steady_pairs = [pairs[i * ns.batch_size:(i + 1) * ns.batch_size] for i in range(1, ns.steps)]
    over_floor = profile_steady(trainer, [trainer._prepare_inputs(trainer.data_collator(b)) for b in steady_pairs],
                            [[(x.prompt, x.chosen, x.rejected) for x in b] for b in steady_pairs],
                            models.param_counts(ns.model, ns.lora_r), ns.precision) if ns.steps > 1 else None

    def forward():  # step 1's batch, forward and backward apart (as Trainer.training_step runs them)
        trainer.model_wrapped.train()
        return trainer.compute_loss(trainer.model_wrapped, batch)

    def backward(loss):
        loss.backward()
        trainer.optimizer.zero_grad()

    census = saved_tensor_census(trainer.model, forward, backward)
    adam = sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    head_itemsize = 2 if ns.precision == "bf16" else 4
    scored = int(batch["score_index"].numel())
    vocab = models.param_counts(ns.model)["vocab"]
    from preftune.logprobs import chunk_rows

    chunk = min(chunk_rows(ns.chunk_size, vocab), scored)
    frozen_head = not trainer.model.get_output_embeddings().weight.requires_grad  # keeps d logp/d h, no softmax
    cached = not frozen_head and scored * vocab * head_itemsize <= ns.cache_mb * 2**20
    head_buffers = chunk * vocab * 4 * (2 if ns.precision == "bf16" else 1) * (0 if cached else 1)
    head_cache = scored * vocab * head_itemsize if cached else 0

    steady = meter.steps[1:] or meter.steps
    mean = lambda k: sum(s[k] for s in steady) / len(steady)  # noqa: E731
    mb = 2**20
    saved_total = sum(census.values())
    peak = meter.steps[0]["peak_rss_mb"]
    memory_rows = [
        ["runtime (python, torch, transformers, preftune imports)", rss_runtime],
        ["weights and buffers (as training holds them: frozen weights a bf16 checkpoint holds exactly are bf16 under bf16)", weight_bytes / mb],
        ["gradients + AdamW state of the trainable parameters", (trainable + adam) / mb],
        [f"activations kept for the backward ({tokens} tokens)", (saved_total - census.get(OUTSIDE_MODULES, 0)) / mb],
        ["LM head: kept softmax (--logprob_cache_mb)", head_cache / mb],
        ["LM head: chunk buffers (transient)", head_buffers / mb],
    ]
    accounted = sum(r[1] for r in memory_rows)
    heap = heap_in_use_mb()
    memory_rows.append(["rest of the peak: gradients in flight, temporaries, allocator slack", peak - accounted])
    memory_rows.append(["peak RSS (step 1, the longest batch; VmHWM)", peak])
    if heap is not None:
        memory_rows.append(["glibc heap size (never trimmed, so its peak) and bytes in use at the end", f"{heap[0]:,.0f} ({heap[1]:,.0f})"])
    report = [
        f"## Where the time and memory go: {ns.model}, {'LoRA r=%d' % ns.lora_r if ns.lora_r else 'full fine-tuning'}, ORPO, "
        f"{ns.batch_size} pairs/step, max_length {ns.max_length} ({ns.select}), {ns.precision}, {ns.attention} attention"
        f"{', gradient checkpointing' if ns.gradient_checkpointing else ''}, --reuse_freed_memory {ns.keep_freed_memory}, "
        f"--selective_checkpointing {ns.selective_checkpointing}, --linear_kernel {ns.linear_kernel}, malloc: {os.environ.get('LD_PRELOAD') or 'system'}"
        f"{', THP_MEM_ALLOC_ENABLE=1' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else ''}",
        "",
        common.markdown_table(["step", "tokens", "wall s", "user CPU s", "kernel CPU s", "minor faults", "step peak RSS MB", "RSS after MB"],
                              [[i + 1, sum(p.packed_length for p in pairs[i * ns.batch_size:(i + 1) * ns.batch_size]), s["wall_s"], s["user_s"],
                                s["kernel_s"], s["minor_faults"], s["peak_rss_mb"], s["rss_mb"]] for i, s in enumerate(meter.steps)]),
        "",
        f"Steady steps (2..{len(meter.steps)}): {mean('wall_s'):.2f} s/step, of which kernel (page-fault) CPU time {mean('kernel_s'):.2f} s. "
        f"RSS: {rss_runtime:,.0f} MB after imports, {rss_weights:,.0f} MB with the weights paged in, {rss_trainer:,.0f} MB with the trainer built.",
        "",
        f"Time of one profiled step on the batch of step 1 ({tokens} tokens, wall {profiled['wall_s']:.2f} s; the profiler adds a little):",
        "",
        common.markdown_table(["class", "seconds", "share"], [[k, v, f"{100 * v / profiled['wall_s']:.0f}%"]
                                                              for k, v in sorted(profiled["seconds"].items(), key=lambda kv: -kv[1])]),
        "",
        *([] if over_floor is None else [
            f"Time over the floor: the batches of steps 2..{ns.steps} run once more under the profiler ({over_floor['tokens']:,.0f} distinct "
            f"tokens per step on average), against the floor (useful FLOPs per class at matmul rates measured right after, in this "
            f"process: " + ", ".join(f"{k} {v:.1f}" for k, v in over_floor["gflops"].items()) + f" GFLOP/s); total / floor "
            f"{over_floor['wall_s'] / sum(over_floor['floor_seconds'].values()):.2f}x:",
            "",
            over_floor_table(over_floor),
            "",
        ]),
        "Memory (MB):",
        "",
        common.markdown_table(["component", "MB"], memory_rows),
        "",
        "Activations kept for the backward, by module (MB): "
        + ", ".join(f"{k} {v / mb:,.0f}" for k, v in sorted(census.items(), key=lambda kv: -kv[1])),
        "",
        "Slowest ops among the decoder's other ops (self seconds): "
        + ", ".join(f"{k} {v:.2f}" for k, v in profiled["other_ops"].items()),
    ]
    print("\n".join(report))
    if ns.out:
        Path(ns.out).write_text(json.dumps({"settings": vars(ns), "steps": meter.steps, "profile": profiled, "steady_profile": over_floor, "census_bytes": census,
                                            "memory_mb": dict(memory_rows), "tokens_profiled": tokens}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
