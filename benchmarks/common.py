"""Shared harness of the preftune-vs-TRL benchmarks (``bench_orpo.py``, ``bench_dpo.py``).

What lives here, so the two scripts hold only what differs between ORPO and DPO:

* the **workload**: the random-init model (``models.py``: the tiny Llama, or Qwen2-0.5B's shape
  with LoRA), written once to a temporary folder that both tools load; the HH-RLHF pairs with an
  explicit prompt; their token ids under preftune's tokenizer (the ids both tools must end up
  training on);
* the **worker side**: every tool runs in a fresh ``python <script> --worker <tool>`` process,
  in the chosen precision (fp32, or bf16 mixed precision for both tools); the process records
  per-step wall time, the loss of every step, the batches it saw and its peak RSS, and writes
  them to a JSON file; a watchdog stops it at ``--memory_cap_gb`` (reported as out of memory)
  before the machine's OOM killer has to pick a victim;
* the **FLOP model** and the measured matmul rates behind "floor seconds per step" (``flops.py``);
* the **report**: Markdown tables on stdout, optionally the raw results as JSON.

Conventions used everywhere below: a workload pair is ``(p, c, r)``, the token ids of prompt,
chosen completion and rejected completion after truncation (EOS included, BOS at the start of
the prompt). ``|p|`` is the prompt length, and so on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import flops as flop_model
import models

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository; a git worktree (e.g. wt/NAME beside main) finds it one level
# up; PREFTUNE_SHARED_DATA points elsewhere (e.g. from a copy of the repository outside the tree)
SHARED_DATA = Path(os.environ.get("PREFTUNE_SHARED_DATA") or next(
    (d / "shared" / "data" for d in REPO.parents if (d / "shared" / "data").is_dir()), REPO.parent / "shared" / "data"))
HH_TEST = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
TOKENIZER_DIR = SHARED_DATA / "llama2-tokenizer"
ASSISTANT = "\n\nAssistant:"

SWEEP_LENGTHS = (256, 512, 1024, 2048)
TOOLS = ("preftune", "trl")

Ids = tuple[list[int], list[int], list[int]]  # (prompt, chosen, rejected)


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------
def read_hh_rows() -> list[dict]:
    if not HH_TEST.exists():
        raise SystemExit(f"benchmark data not found: {HH_TEST} (the benchmarks need ../shared/data next to the repo)")
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def explicit_pairs(rows: list[dict]) -> list[dict]:
    """HH rows as explicit ``{prompt, chosen, rejected}``: prompt = text up to and including the
    last ``"\\n\\nAssistant:"`` of ``chosen``; rows whose ``rejected`` does not share that prompt,
    or whose completions are empty or identical, are skipped."""
    out = []
    for i, row in enumerate(rows):
        chosen, rejected = row["chosen"], row["rejected"]
        cut = chosen.rfind(ASSISTANT)
        if cut < 0:
            continue
        prompt = chosen[: cut + len(ASSISTANT)]
        c, r = chosen[len(prompt):], rejected[len(prompt):]
        if not rejected.startswith(prompt) or not c.strip() or not r.strip() or c == r:
            continue
        out.append({"prompt": prompt, "chosen": c, "rejected": r, "hh_row": i})
    return out


def stacked_pairs(pairs: list[dict], tokenizer, max_length: int, headroom: int = 96) -> list[dict]:
    """Long-context variant for the memory sweep: HH dialogues are at most ~1,060 tokens, so to
    fill ``max_length`` the prompt of pair ``i`` is prefixed with whole earlier dialogues
    (``chosen`` texts of the following rows, each "\\n\\nHuman: ... \\n\\nAssistant: ...") while
    the prompt stays below ``max_length - headroom`` tokens. The completion is then truncated at
    ``max_length``. Prompt-heavy by construction (it favours prefix sharing)."""
    out = []
    n = len(pairs)
    for i, pair in enumerate(pairs):
        prompt = pair["prompt"]
        budget = max_length - headroom
        j = i + 1
        while True:
            prev = pairs[j % n]
            candidate = prev["prompt"] + prev["chosen"] + prompt
            if j - i > n or len(tokenizer(candidate)["input_ids"]) > budget:
                break
            prompt = candidate
            j += 1
        out.append({**pair, "prompt": prompt, "stacked_dialogues": j - i - 1})
    return out


@dataclass
class Workload:
    """The pairs both tools train on, as text (what each tool is given) and as token ids (what
    each tool must end up with)."""

    rows: list[dict]
    ids: list[Ids]
    max_length: int
    selection: str
    dropped: dict = field(default_factory=dict)

    @property
    def seq_lengths(self) -> list[tuple[int, int]]:
        """``(|p|+|c|, |p|+|r|)`` per pair: the two sequences a padded trainer runs."""
        return [(len(p) + len(c), len(p) + len(r)) for p, c, r in self.ids]

    def batches(self, steps: int, batch_size: int) -> list[list[int]]:
        """Pair indices of each step under sequential sampling (wrapping into a new epoch)."""
        n = len(self.ids)
        per_epoch = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        return [per_epoch[k % len(per_epoch)] for k in range(steps)]

    def summary(self) -> dict:
        p = [len(x[0]) for x in self.ids]
        full = [max(a, b) for a, b in self.seq_lengths]
        return {
            "pairs": len(self.ids),
            "selection": self.selection,
            "max_length": self.max_length,
            "prompt_tokens_mean": round(statistics.mean(p), 1),
            "longest_sequence": max(full),
            "mean_sequence": round(statistics.mean(full), 1),
            "dropped": self.dropped,
        }


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.tokenizer_dir(model_dir)))


def build_workload(tokenizer, max_length: int, n_pairs: int, selection: str = "first") -> Workload:
    """The first ``n_pairs`` explicit-prompt HH pairs that survive tokenization at ``max_length``.

    Tokenized with preftune's own code and TRL's truncation rule (no separate prompt limit;
    completions cut to ``max_length - |p|``; a pair whose prompt fills ``max_length`` is dropped,
    since TRL 1.16's ORPO would train on an empty completion and produce NaN).
    ``selection``: ``first`` (file order) or ``stacked`` (see :func:`stacked_pairs`).
    """
    from preftune.data.formats import PreferenceExample
    from preftune.data.tokenize import TokenizeSettings, tokenize_examples

    candidates = explicit_pairs(read_hh_rows())
    if selection == "stacked":
        candidates = stacked_pairs(candidates[: n_pairs * 2], tokenizer, max_length)
    elif selection != "first":
        raise ValueError(f"unknown selection {selection!r}")
    settings = TokenizeSettings(max_length=max_length, max_prompt_length=None, truncation_mode="keep_end", chat_template="never")
    rows, ids, dropped = [], [], Counter()
    start = 0
    while len(rows) < n_pairs and start < len(candidates):
        chunk = candidates[start : start + 2 * n_pairs]
        examples = [PreferenceExample(x["prompt"], x["chosen"], x["rejected"], None, f"hh row {x['hh_row']}", start + k) for k, x in enumerate(chunk)]
        pairs, report = tokenize_examples(tokenizer, examples, settings)
        dropped.update(report.dropped)
        for pair in pairs:
            if len(rows) == n_pairs:
                break
            rows.append(candidates[pair.example_id])
            ids.append((pair.prompt, pair.chosen, pair.rejected))
        start += len(chunk)
    if len(rows) < n_pairs:
        raise SystemExit(f"only {len(rows)} usable pairs at max_length {max_length}")
    return Workload(rows, ids, max_length, selection, dict(dropped))


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
def worker_env(threads: int, allocator: str = "system") -> dict:
    """The environment of a worker process; ``allocator`` ``jemalloc``/``tcmalloc`` preloads that
    library (the same for both tools: preftune's CLI would restart on it by itself, see
    ``preftune.allocator``; the workers call the library directly, so the harness does it)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator != "system":
        from preftune.allocator import allocator_to_preload

        from preftune.allocator import RETAIN_FREED_PAGES

        name, library = allocator_to_preload({"PREFTUNE_ALLOCATOR": allocator})
        env["LD_PRELOAD"] = library
        variable, value = RETAIN_FREED_PAGES[name]  # as preftune's own restart sets it
        env.setdefault(variable, value)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def setup_worker(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if spec.get("memory_cap_gb"):
        start_memory_watchdog(spec["memory_cap_gb"], spec.get("result_path"))


def start_memory_watchdog(cap_gb: float, result_path: str | None, interval: float = 0.05):
    """Stop this worker when its RSS passes ``cap_gb``, writing an out-of-memory result first.

    The benchmark machine is shared: a worker growing past the free memory would make the
    kernel's OOM killer pick a victim, possibly someone else's process. RSS grows as pages are
    touched, so polling every 50 ms stops it within a few hundred MB of the cap.
    """
    import threading

    def watch():
        while True:
            rss = current_rss_mb()
            if rss > cap_gb * 1024:
                if result_path:
                    Path(result_path).write_text(json.dumps({
                        "error": f"out of memory: RSS passed the {cap_gb:g} GB cap ({rss:,.0f} MB)", "oom": True,
                        "peak_rss_mb": peak_rss_mb(), "steps_done": _steps_done[0],
                    }))
                os._exit(3)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True).start()


_steps_done = [0]  # optimizer steps finished, for the watchdog's report


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def training_kwargs(spec: dict, tool: str) -> dict:
    """The TrainingArguments both tools get: same optimizer, schedule, batch order, no eval/saving."""
    return dict(
        output_dir=str(Path(spec["tmp"]) / f"out-{tool}"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused",  # transformers' default optimizer (fused AdamW kernel, CPU included)
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=spec["seed"],
        data_seed=spec["seed"],
        train_sampling_strategy="sequential",  # both tools see the same batches in the same order
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=True,
        bf16=spec.get("precision") == "bf16",  # mixed precision: fp32 weights and optimizer, bf16 matmuls
        fp16=False,
        gradient_checkpointing=spec.get("gradient_checkpointing", False),  # TRL's configs default it to True
        remove_unused_columns=False,
        disable_dropout=True,
    )


def step_timer():
    """A TrainerCallback recording wall time from ``on_train_begin`` to each ``on_step_end``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.ends: list[float] = []
            self.rss_at_start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_at_start = current_rss_mb()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            _steps_done[0] = len(self.ends)

        def step_seconds(self) -> list[float]:
            marks = [self.t0] + self.ends
            return [b - a for a, b in zip(marks, marks[1:])]

    return StepTimer()


def instrument(trainer_cls, fingerprint: Callable[[dict], list[tuple[int, int]]]):
    """Subclass ``trainer_cls`` to record each training step's exact loss (as returned by
    ``compute_loss``, before the Trainer's logging rounds it) and the batch it was computed on."""

    class Instrumented(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                rec = self.__dict__.setdefault("bench_record", {"losses": [], "batches": []})
                rec["losses"].append(float(loss.detach()))
                rec["batches"].append(fingerprint(inputs))
            return out

    Instrumented.__name__ = f"Instrumented{trainer_cls.__name__}"
    return Instrumented


def compare_ids(found: list[tuple[list[int], list[int], int]], expected: list[Ids]) -> dict:
    """Compare a tool's tokenized sequences ``(prompt+chosen, prompt+rejected, |p|)`` with the
    workload's ids. Returns the number of differing pairs and the first difference."""
    bad, first = 0, None
    for k, ((fc, fr, n_p), (p, c, r)) in enumerate(zip(found, expected)):
        if (list(fc), list(fr), n_p) != (p + c, p + r, len(p)):
            bad += 1
            if first is None:
                first = {"pair": k, "tool_prompt_len": n_p, "expected_prompt_len": len(p),
                         "tool_chosen_head": list(fc[:8]), "expected_chosen_head": (p + c)[:8],
                         "tool_chosen_tail": list(fc[-4:]), "expected_chosen_tail": (p + c)[-4:]}
    if len(found) != len(expected):
        bad += abs(len(found) - len(expected))
    return {"pairs_checked": len(found), "pairs_differing": bad, "first_difference": first}


def finish_worker(trainer, timer, spec: dict, extra: dict) -> dict:
    """Collect a worker's measurements after ``trainer.train()``."""
    rec = trainer.__dict__.get("bench_record", {"losses": [], "batches": []})
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    step1 = history[0] if history else {}
    return {
        "step_seconds": timer.step_seconds(),
        "losses": rec["losses"],
        "batches": rec["batches"],
        "step1_metrics": {k: v for k, v in step1.items() if isinstance(v, (int, float))},
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_train_start_mb": timer.rss_at_start,
        "torch_threads": __import__("torch").get_num_threads(),
        **extra,
    }


def lora_config(spec: dict):
    """The adapters both tools train: rank r on every projection, alpha 2r, no dropout."""
    from peft import LoraConfig

    r = spec["lora_r"]
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=models.LORA_TARGETS, bias="none", task_type="CAUSAL_LM")


def preftune_worker(spec: dict, method: str, make_reference=None) -> dict:
    """Train with preftune's own loading, tokenization and trainer (no saving, no eval).

    ``make_reference(model, model_args, args, choice, pairs, tokenizer, spec)`` returns
    ``(reference_callable, description)`` for methods that need one.
    """
    setup_worker(spec)
    from preftune.config import ModelArguments, PreftuneConfig
    from preftune.data import load_examples
    from preftune.data.tokenize import TokenizeSettings, tokenize_examples
    from preftune.training_model import DeviceChoice, apply_peft, choose_device, load_model
    from preftune.training_model import load_tokenizer as preftune_tokenizer
    from preftune.trainer import PreferenceTrainer

    tok = preftune_tokenizer(str(models.tokenizer_dir(spec["model_dir"])))
    loaded = load_examples(spec["data_file"], "train")
    settings = TokenizeSettings(max_length=spec["max_length"], max_prompt_length=None, truncation_mode="keep_end", chat_template="never")
    pairs, _ = tokenize_examples(tok, loaded.examples, settings)
    ids_check = compare_ids([(p.prompt + p.chosen, p.prompt + p.rejected, len(p.prompt)) for p in pairs], spec["expected_ids"])

    lora_r = spec.get("lora_r", 0)
    margs = ModelArguments(model_name_or_path=spec["model_dir"], torch_dtype="float32", use_peft=lora_r > 0,
                           lora_r=max(lora_r, 1), lora_alpha=2 * max(lora_r, 1), lora_dropout=0.0)
    choice = choose_device("float32", "sdpa", spec["layout"])
    if spec.get("attention") == "dense":  # the packed layout on the dense (T, T) mask: the reference path
        choice = DeviceChoice(choice.device, choice.dtype, "sdpa")
    model = load_model(spec["model_dir"], margs, choice)
    if lora_r:
        model = apply_peft(model, margs, spec.get("gradient_checkpointing", False))
    args = PreftuneConfig(
        **training_kwargs(spec, "preftune"),
        # preftune's preflight (on by default) runs forward+backward on the largest batch of the
        # whole dataset before step 1; off by default here so both tools' peak RSS covers the
        # same batches (--preflight turns it on)
        memory_preflight=spec["preflight"],
        selective_checkpointing=spec.get("selective_checkpointing", "mlp"),
        linear_kernel=spec.get("linear_kernel", "auto"),
        method=method,
        beta=spec["beta"],
        nll_on_prompt=spec.get("nll_on_prompt", False),
        batch_layout=spec["layout"],
        logprob_chunk_size=spec["chunk_size"],
        ref_model_name_or_path=spec["model_dir"] if make_reference and not lora_r else None,
    )
    reference, ref_desc = (None, None)
    if make_reference is not None:
        reference, ref_desc = make_reference(model, margs, args, choice, pairs, tok, spec)

    lengths = {p.example_id: (len(p.prompt) + len(p.chosen), len(p.prompt) + len(p.rejected)) for p in pairs}
    timer = step_timer()
    trainer = instrument(PreferenceTrainer, lambda b: [lengths[i] for i in b["example_ids"].tolist()])(
        model=model, args=args, train_pairs=pairs, processing_class=tok, reference=reference, callbacks=[timer]
    )
    trainer.train()
    return finish_worker(trainer, timer, spec, {"ids_check": ids_check, "reference": ref_desc, "layout": spec["layout"],
                                                "attention": choice.describe(), "precision": args.precision_choice.describe()})


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def matmul_worker(spec: dict) -> dict:
    """The floor's matmul rates (:func:`flops.matmul_rates`) in a fresh process."""
    setup_worker(spec)
    params = models.param_counts(spec["model"], spec.get("lora_r", 0))
    return flop_model.matmul_rates(params, spec["tokens"], spec["run_tokens"], spec["precision"])


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------
@dataclass
class Benchmark:
    """What differs between the ORPO and DPO benchmarks."""

    name: str  # "ORPO" / "DPO"
    trl_trainer: str  # for the report
    script: str  # path of the calling script (re-run with --worker)
    workers: dict  # tool -> fn(spec) -> result dict
    scored_tokens: Callable[[Ids], int]  # LM-head tokens per pair of preftune's objective
    reference: bool  # a frozen reference forward is part of every step
    trl_head_chunked: bool = False  # TRL's LM head recomputes its logits in the backward (DPO's fused head)
    spec_extra: dict = field(default_factory=dict)  # method settings passed to the workers
    spec_args: tuple = ()  # names of extra command-line options passed on to the workers
    agreement_keys: tuple = ("loss",)  # first-step quantities that must agree (loss + step-1 metrics)
    notes: list = field(default_factory=list)


def add_checkpoint_dtype_argument(p: argparse.ArgumentParser) -> None:
    """``--checkpoint_dtype``: the dtype the benchmark model is saved in (every tool loads it in float32)."""
    p.add_argument("--checkpoint_dtype", choices=("float32", "bfloat16"), default="float32",
                   help="save the random-init model in this dtype (bfloat16: as published checkpoints are; every tool loads it in "
                        "float32, and preftune's bf16 runs then store its frozen linear weights in bf16)")


def add_preftune_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--selective_checkpointing`` and ``--linear_kernel``, passed to preftune as given (defaults: preftune's own)."""
    p.add_argument("--selective_checkpointing", choices=("true", "mlp", "false"), default="mlp", help="preftune's --selective_checkpointing")
    p.add_argument("--linear_kernel", choices=("auto", "onednn", "default"), default="auto", help="preftune's --linear_kernel")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per tool")
    p.add_argument("--max_length", type=int, default=512, help="max tokens of prompt + completion")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    p.add_argument("--pairs", type=int, default=64, help="pairs in the workload (first N explicit-prompt HH pairs)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--which", choices=("preftune", "trl", "both"), default="both")
    p.add_argument("--sweep", action="store_true", help="also measure peak RSS at max_length 256, 512, 1024, 2048")
    p.add_argument("--sweep_steps", type=int, default=3, help="steps per tool in the sweep")
    p.add_argument("--sweep_lengths", type=str, default=",".join(map(str, SWEEP_LENGTHS)))
    p.add_argument("--sweep_select", choices=("stacked", "first"), default="stacked",
                   help="sweep pairs: stacked = HH prompts prefixed with earlier dialogues to fill max_length; first = same pairs as the main run")
    p.add_argument("--repeats", type=int, default=1, help="run each tool this many times (alternating) and keep the median")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", choices=tuple(models.MODELS), default="tiny", help="benchmark model (benchmarks/models.py)")
    p.add_argument("--lora_r", type=int, default=0, help="LoRA rank on every projection for both tools (0: train every weight)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both tools: fp32, or bf16 mixed precision")
    p.add_argument("--select", choices=("first", "stacked"), default="first",
                   help="main workload: first = the first HH pairs; stacked = HH prompts prefixed with earlier dialogues to fill max_length")
    p.add_argument("--gradient_checkpointing", action="store_true", help="both tools: recompute each layer in the backward")
    p.add_argument("--memory_cap_gb", type=float, default=20.0, help="stop a worker whose RSS passes this (reported as out of memory)")
    p.add_argument("--layout", choices=("packed", "padded"), default="packed", help="preftune batch layout")
    p.add_argument("--attention", choices=("segments", "dense"), default="segments",
                   help="preftune's packed-layout attention: segment attention (default) or the dense (T, T) mask (the reference path)")
    p.add_argument("--chunk_size", type=int, default=0, help="preftune --logprob_chunk_size (default 0: preftune's own automatic choice, as users get it)")
    add_preftune_engine_arguments(p)
    p.add_argument("--allocator", choices=("system", "jemalloc", "tcmalloc"), default="system",
                   help="both tools' workers run on this malloc (jemalloc/tcmalloc via LD_PRELOAD; must be installed)")
    p.add_argument("--preflight", action="store_true", help="keep preftune's memory preflight (a forward+backward on the largest batch before step 1)")
    p.add_argument("--no_floor", action="store_true", help="skip the matmul-rate measurement")
    p.add_argument("--out", type=str, default=None, help="write all results as JSON here")
    p.add_argument("--keep_tmp", action="store_true", help="keep the temporary model/data folder")
    p.add_argument("--model_dir", default=None, help="create the benchmark model here once and reuse it in later runs (same --model and --seed)")
    add_checkpoint_dtype_argument(p)
    p.add_argument("--worker", choices=(*TOOLS, "matmul"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def run_worker(bench: Benchmark, role: str, spec: dict, tmp: Path) -> dict:
    """Run ``role`` in a fresh process of the calling script; return its result (or an error)."""
    spec_path = tmp / f"spec-{role}.json"
    result_path = tmp / f"result-{role}.json"
    spec = {**spec, "result_path": str(result_path)}  # also where the memory watchdog reports
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, bench.script, "--worker", role, "--spec", str(spec_path), "--result", str(result_path)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env(spec["threads"], spec.get("allocator", "system")), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode == 3 and result_path.exists():  # stopped by the memory watchdog
        result = json.loads(result_path.read_text())
        print(f"[{role}] {result['error']} after {result['steps_done']} steps", file=sys.stderr)
        return {**result, "process_seconds": wall}
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        if proc.returncode < 0:
            tail += f"\n(killed by signal {-proc.returncode}{'; out of memory?' if proc.returncode == -9 else ''})"
        print(f"[{role}] worker failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"error": tail, "exit_code": proc.returncode, "process_seconds": wall}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = wall
    return result


def worker_main(bench: Benchmark, ns) -> None:
    spec = json.loads(Path(ns.spec).read_text())
    result = matmul_worker(spec) if ns.worker == "matmul" else bench.workers[ns.worker](spec)
    Path(ns.result).write_text(json.dumps(result))


def write_workload(workload: Workload, tmp: Path, tag: str) -> Path:
    path = tmp / f"pairs-{tag}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in workload.rows:
            f.write(json.dumps({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
    return path


def summarize(result: dict, real_tokens: list[int]) -> dict:
    """Steady-state (steps 2..N) and all-step timing, tokens/s and memory of one run."""
    if "error" in result:
        return result
    secs = result["step_seconds"]
    steady = secs[1:] if len(secs) > 1 else secs
    out = {
        "s_per_step": statistics.mean(steady),
        "s_per_step_all": statistics.mean(secs),
        "step1_s": secs[0],
        "tokens_per_s": sum(real_tokens[1:] or real_tokens) / sum(steady),
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_at_train_start_mb": result["rss_at_train_start_mb"],
        "first_loss": result["losses"][0] if result["losses"] else float("nan"),
    }
    return out


def _median_run(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: statistics.mean(r["step_seconds"][1:] or r["step_seconds"]))
    return ok[len(ok) // 2]


def run_tools(bench: Benchmark, ns, workload: Workload, model_dir: Path, tmp: Path, steps: int, tag: str) -> dict:
    data_file = write_workload(workload, tmp, tag)
    spec = {
        "model_dir": str(model_dir), "data_file": str(data_file), "expected_ids": workload.ids,
        "max_length": workload.max_length, "steps": steps, "batch_size": ns.batch_size, "lr": ns.lr,
        "beta": ns.beta, "seed": ns.seed, "threads": ns.threads, "layout": ns.layout,
        "chunk_size": ns.chunk_size, "preflight": ns.preflight, "tmp": str(tmp), "model": ns.model, "lora_r": ns.lora_r,
        "precision": ns.precision, "attention": ns.attention, "gradient_checkpointing": ns.gradient_checkpointing,
        "memory_cap_gb": ns.memory_cap_gb, "allocator": ns.allocator, "selective_checkpointing": ns.selective_checkpointing,
        "linear_kernel": ns.linear_kernel,
        **bench.spec_extra,
        **{k: getattr(ns, k) for k in bench.spec_args},
    }
    tools = TOOLS if ns.which == "both" else (ns.which,)
    runs = {t: [] for t in tools}
    for _ in range(ns.repeats):
        for tool in tools:
            print(f"  running {tool} ({bench.name}, max_length {workload.max_length}, {steps} steps) ...", file=sys.stderr, flush=True)
            runs[tool].append(run_worker(bench, tool, spec, tmp))
    return {t: _median_run(r) for t, r in runs.items()}


def real_tokens_per_step(workload: Workload, steps: int, batch_size: int) -> list[int]:
    """Real (non-padding) tokens per step, counted the same way for both tools: both sequences
    of every pair, ``(|p|+|c|) + (|p|+|r|)`` (the prompt counts twice even where preftune runs it once)."""
    lengths = workload.seq_lengths
    return [sum(lengths[i][0] + lengths[i][1] for i in b) for b in workload.batches(steps, batch_size)]


def agreement_tolerance(precision: str) -> float:
    """First-step agreement required: 1e-4 relative in fp32; in bf16 the tools round different
    intermediate values to 8 significant bits, so 2e-2 (a few bf16 roundings of the loss)."""
    return 1e-4 if precision == "fp32" else 2e-2


def agreement(bench: Benchmark, res: dict, tol: float = 1e-4) -> dict:
    """Relative differences of the first-step loss and metrics between the tools."""
    a, b = res.get("preftune", {}), res.get("trl", {})
    if "error" in a or "error" in b or not a or not b:
        return {}
    out = {}
    pairs = {"loss": (a["losses"][0], b["losses"][0])}
    for k in bench.agreement_keys:
        if k != "loss" and k in a["step1_metrics"] and k in b["step1_metrics"]:
            pairs[k] = (a["step1_metrics"][k], b["step1_metrics"][k])
    for k, (x, y) in pairs.items():
        rel = abs(x - y) / max(abs(y), 1e-12)
        # the loss must agree to 1e-4 relative; a metric near zero (log-odds, rewards at step 1)
        # is judged on its absolute difference instead
        ok = rel <= tol or (k != "loss" and abs(x - y) <= 1e-6 / 1e-4 * tol)
        out[k] = {"preftune": x, "trl": y, "rel_diff": rel, "abs_diff": abs(x - y), "ok": ok}
    n = min(len(a["losses"]), len(b["losses"]))
    out["later_steps_rel_diff"] = [abs(a["losses"][i] - b["losses"][i]) / max(abs(b["losses"][i]), 1e-12) for i in range(1, n)]
    out["same_batches"] = [sorted(x) for x in a["batches"]] == [sorted(y) for y in b["batches"]]
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            if math.isnan(x):
                return "n/a"
            return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(x, y):
    try:
        return x / y
    except (TypeError, ZeroDivisionError):
        return float("nan")


def main_report(bench: Benchmark, ns, res: dict, summ: dict, agree: dict, flops: dict, floor: dict | None, workload: Workload) -> str:
    p, t = summ.get("preftune", {}), summ.get("trl", {})
    g = lambda d, k: d.get(k, float("nan")) if "error" not in d else float("nan")  # noqa: E731
    lines = [f"## {bench.name}: preftune vs TRL {bench.trl_trainer}", ""]
    ws = workload.summary()
    training = f"LoRA r={ns.lora_r} on every projection" if ns.lora_r else "every weight trained"
    lines.append(
        f"Model {ns.model} ({training}); workload: {ws['pairs']} HH-RLHF harmless-base pairs ({ws['selection']}), max_length {ws['max_length']}, "
        f"batch {ns.batch_size}, {ns.steps} steps, {ns.threads} threads, {ns.precision}; mean prompt {ws['prompt_tokens_mean']} tokens, "
        f"longest sequence {ws['longest_sequence']}. preftune layout: {ns.layout} ({ns.attention} attention), "
        f"memory preflight {'on' if ns.preflight else 'off'}{', gradient checkpointing (both)' if ns.gradient_checkpointing else ''}; "
        f"malloc (both): {ns.allocator}."
    )
    for note in bench.notes:
        lines.append(note)
    lines.append("")
    rows = [
        ["s/step (steps 2..N)", g(p, "s_per_step"), g(t, "s_per_step"), _ratio(g(p, "s_per_step"), g(t, "s_per_step"))],
        ["s/step (all steps, incl. step 1)", g(p, "s_per_step_all"), g(t, "s_per_step_all"), _ratio(g(p, "s_per_step_all"), g(t, "s_per_step_all"))],
        ["step 1 s (warm-up)", g(p, "step1_s"), g(t, "step1_s"), _ratio(g(p, "step1_s"), g(t, "step1_s"))],
        ["tokens/s (real tokens, steps 2..N)", g(p, "tokens_per_s"), g(t, "tokens_per_s"), _ratio(g(p, "tokens_per_s"), g(t, "tokens_per_s"))],
        ["peak RSS MB", g(p, "peak_rss_mb"), g(t, "peak_rss_mb"), _ratio(g(p, "peak_rss_mb"), g(t, "peak_rss_mb"))],
        ["RSS at train start MB", g(p, "rss_at_train_start_mb"), g(t, "rss_at_train_start_mb"), _ratio(g(p, "rss_at_train_start_mb"), g(t, "rss_at_train_start_mb"))],
        ["first-step loss", g(p, "first_loss"), g(t, "first_loss"), _ratio(g(p, "first_loss"), g(t, "first_loss"))],
    ]
    lines.append(markdown_table(["", "preftune", f"TRL {bench.trl_trainer}", "preftune/TRL"], rows))
    speedup = _ratio(g(t, "s_per_step"), g(p, "s_per_step"))
    if not math.isnan(speedup):
        lines.append("")
        lines.append(f"Speed-up (TRL s/step / preftune s/step, steps 2..N): **{speedup:.2f}x**; "
                     f"peak RSS preftune/TRL: **{_ratio(g(p, 'peak_rss_mb'), g(t, 'peak_rss_mb')):.2f}**")
    if agree:
        lines.append("")
        lines.append(f"First-step agreement (must be <= {agreement_tolerance(ns.precision):g} relative):")
        lines.append("")
        arow = [[k, f"{v['preftune']:.8g}", f"{v['trl']:.8g}", f"{v['rel_diff']:.2e}", f"{v['abs_diff']:.2e}", "ok" if v["ok"] else "MISMATCH"]
                for k, v in agree.items() if isinstance(v, dict)]
        lines.append(markdown_table(["quantity", "preftune", "TRL", "relative difference", "absolute difference", ""], arow))
        later = agree.get("later_steps_rel_diff") or []
        lines.append("")
        lines.append(f"Same batches in the same order: {'yes' if agree.get('same_batches') else 'NO'}. "
                     f"Loss relative difference at later steps (informational; Adam amplifies float noise): "
                     + (", ".join(f"{x:.1e}" for x in later) if later else "n/a"))
    for tool in ("preftune", "trl"):
        r = res.get(tool, {})
        chk = r.get("ids_check")
        if chk:
            lines.append(f"- {tool} token ids vs workload: {chk['pairs_checked'] - chk['pairs_differing']}/{chk['pairs_checked']} pairs identical"
                         + (f"; first difference {chk['first_difference']}" if chk["pairs_differing"] else ""))
        if r.get("reference"):
            lines.append(f"- {tool} reference model: {r['reference']}")
    lines.append("")
    lines.append("Work per step, GFLOP (mean of steps 2..N; see docs/benchmarks.md for the model):")
    lines.append("")
    frows = []
    for k in ("layers", "head", "attention", "total"):
        frows.append([k, flops["useful"][k] / 1e9, flops["preftune"][k] / 1e9, flops["trl"][k] / 1e9])
    lines.append(markdown_table(["", "useful", "preftune packed executes", "padded (TRL) executes"], frows))
    lines.append("")
    lines.append(f"Attention (query, key) pairs per step: useful {flops['useful_attention_pairs']:,.0f}, preftune computes "
                 f"{flops['preftune_attention_pairs']:,.0f} ({_ratio(flops['preftune_attention_pairs'], flops['useful_attention_pairs']):.2f}x); "
                 f"preftune rows per step {flops['packed_rows']:.2f} of {flops['packed_row_tokens']:,.0f} tokens.")
    if floor:
        fl = flop_model.floor_seconds(flops["useful"], floor["gflops"])
        rates = ", ".join(f"{k} {v:.1f}" for k, v in floor["gflops"].items())
        lines.append("")
        lines.append(f"Machine floor: measured {floor['dtype']} matmul GFLOP/s ({floor['threads']} threads, best of 5): {rates}. "
                     f"Useful work {flops['useful']['total'] / 1e9:.2f} GFLOP/step -> floor **{fl:.3f} s/step**; "
                     f"preftune at {_ratio(g(p, 's_per_step'), fl):.2f}x the floor, TRL at {_ratio(g(t, 's_per_step'), fl):.2f}x.")
        floor["floor_s_per_step"] = fl
    return "\n".join(lines)


def sweep_report(bench: Benchmark, sweep: list[dict]) -> str:
    rows = []
    for s in sweep:
        p, t = s["summary"].get("preftune", {}), s["summary"].get("trl", {})
        g = lambda d, k: d.get(k, float("nan")) if "error" not in d else float("nan")  # noqa: E731
        rows.append([s["max_length"], s["workload"]["pairs"], s["workload"]["longest_sequence"], s["workload"]["mean_sequence"],
                     g(p, "s_per_step"), g(t, "s_per_step"), g(p, "peak_rss_mb"), g(t, "peak_rss_mb"),
                     _ratio(g(p, "peak_rss_mb"), g(t, "peak_rss_mb"))])
    head = ["max_length", "pairs", "longest seq", "mean seq", "preftune s/step", "TRL s/step", "preftune peak RSS MB", "TRL peak RSS MB", "RSS preftune/TRL"]
    return f"## {bench.name} memory sweep\n\n" + markdown_table(head, rows)


def prepare_model(ns, tmp: Path) -> Path:
    """The benchmark model's folder: ``--model_dir`` if it already holds it, else created there
    (or in ``tmp``) by :func:`models.create_model`."""
    model_dir = Path(ns.model_dir) if ns.model_dir else tmp / "model"
    stamp = model_dir / "bench_model.json"
    checkpoint_dtype = getattr(ns, "checkpoint_dtype", "float32")
    want = {"model": ns.model, "seed": ns.seed, "tokenizer": "llama-2 in tokenizer/"}
    if checkpoint_dtype != "float32":  # (float32 folders made before the option keep their stamp)
        want["checkpoint_dtype"] = checkpoint_dtype
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        models.create_model(model_dir, ns.model, ns.seed, TOKENIZER_DIR, checkpoint_dtype)
        stamp.write_text(json.dumps(want))
    return model_dir


def step_work(bench: Benchmark, ns, workload: Workload, steps: int) -> dict:
    """Counted FLOPs per step of ``workload`` (mean of steps 2..N)."""
    batches = [[workload.ids[i] for i in b] for b in workload.batches(steps, ns.batch_size)]
    params = models.param_counts(ns.model, ns.lora_r)
    return flop_model.mean_step_flops(batches, params, bench.scored_tokens, bench.reference, trainable_head=ns.lora_r == 0,
                                      trl_head_chunked=bench.trl_head_chunked, attention=ns.attention, precision=ns.precision)


def measure_floor(bench: Benchmark, ns, flops: dict, workload: Workload, tmp: Path) -> dict | None:
    """Matmul rates at this workload's shapes, in a fresh process (None with ``--no_floor``)."""
    if ns.no_floor:
        return None
    run = statistics.mean(len(p) + len(c) for p, c, _ in workload.ids)  # a typical [prompt, chosen] run
    spec = {"threads": ns.threads, "model": ns.model, "lora_r": ns.lora_r, "precision": ns.precision,
            "tokens": round(flops["distinct_tokens"]), "run_tokens": round(run)}
    floor = run_worker(bench, "matmul", spec, tmp)
    return None if "error" in floor else floor


def run_benchmark(bench: Benchmark, ns, tmp: Path) -> dict:
    """One comparison (both tools, the main workload) with everything the reports need."""
    model_dir = prepare_model(ns, tmp)
    tok = load_tokenizer(model_dir)
    workload = build_workload(tok, ns.max_length, ns.pairs, ns.select)
    flops = step_work(bench, ns, workload, ns.steps)
    floor = measure_floor(bench, ns, flops, workload, tmp)
    res = run_tools(bench, ns, workload, model_dir, tmp, ns.steps, f"main-{ns.max_length}")
    real = real_tokens_per_step(workload, ns.steps, ns.batch_size)
    summ = {k: summarize(v, real) for k, v in res.items()}
    agree = agreement(bench, res, agreement_tolerance(ns.precision))
    if floor:
        floor["floor_s_per_step"] = flop_model.floor_seconds(flops["useful"], floor["gflops"])
    return {"workload": workload, "model_dir": model_dir, "tokenizer": tok, "flops": flops, "floor": floor, "results": res,
            "summary": summ, "agreement": agree}


def failed(run: dict) -> bool:
    """A tool failed for a reason other than running out of memory, or the first steps disagree."""
    bad_tool = any("error" in v and not v.get("oom") for v in run["results"].values())
    return bad_tool or any(isinstance(v, dict) and not v["ok"] for v in run["agreement"].values())


def main(bench: Benchmark, argv=None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or base_parser(f"preftune vs TRL {bench.trl_trainer} benchmark")
    ns = parser.parse_args(argv)
    if ns.worker:
        worker_main(bench, ns)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{bench.name.lower()}-"))
    try:
        run = run_benchmark(bench, ns, tmp)
        print(main_report(bench, ns, run["results"], run["summary"], run["agreement"], run["flops"], run["floor"], run["workload"]))
        sweep = []
        if ns.sweep:
            for length in [int(x) for x in ns.sweep_lengths.split(",") if x.strip()]:
                wl = build_workload(run["tokenizer"], length, ns.pairs, ns.sweep_select)
                r = run_tools(bench, ns, wl, run["model_dir"], tmp, ns.sweep_steps, f"sweep-{length}")
                s_real = real_tokens_per_step(wl, ns.sweep_steps, ns.batch_size)
                sweep.append({"max_length": length, "workload": wl.summary(), "results": r,
                              "summary": {k: summarize(v, s_real) for k, v in r.items()}})
            print()
            print(sweep_report(bench, sweep))
        if ns.out:
            Path(ns.out).write_text(json.dumps({
                "benchmark": bench.name, "argv": sys.argv, "settings": vars(ns), "workload": run["workload"].summary(),
                "params": models.param_counts(ns.model, ns.lora_r), "flops_per_step": run["flops"], "floor": run["floor"],
                "results": run["results"], "summary": run["summary"], "agreement": run["agreement"], "sweep": sweep,
            }, indent=1, default=str))
        return 1 if failed(run) or any(failed({"results": s["results"], "agreement": {}}) for s in sweep) else 0
    finally:
        if ns.keep_tmp:
            print(f"(kept {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
