"""Data-pipeline benchmark: preftune's tokenized cache vs TRL 1.16's ORPO preprocessing.

The rows: the HH-RLHF harmless-base test split (``../shared/data``), repeated to N pairs and
written as JSON lines (N = 10k, 100k, 1M by default). Both tools read that file with the
Llama-2 tokenizer, ``--num_proc`` tokenizing processes, max_length 1024.

For every N and tool, each phase in a fresh process (``--worker``):

* **first**: cold caches. preftune: ``prepare_data`` (hash the file, read + normalise + tokenize
  through ``datasets``, write the cache, select, truncate) and the first collated batch. TRL:
  ``datasets.load_dataset("json")`` + ``ORPOTrainer.__init__`` (its ``maybe_extract_prompt``,
  ``maybe_apply_chat_template`` and ``tokenize_row`` maps) + the first batch of its dataloader.
* **cached**: the same again with the caches of the first run: the "data time" to step 1.
* **train** (preftune): the cached run, then ``--train_steps`` optimizer steps of a tiny Llama
  (vocabulary 32,000) with the memory preflight on. Every file holds the same 2,312 distinct
  rows, so the longest batch (what the preflight runs) is the same at every size: the growth of
  the training peak from the smallest size to the largest is the data's.
* **legacy** (optional, ``--legacy_src DIR``): the pre-cache path (``load_examples`` +
  ``tokenize_examples`` into Python lists) from a source tree, e.g.
  ``git archive e7df296 preftune | tar -x -C DIR``.

Seconds exclude interpreter start, imports and loading the tokenizer; RSS is
``getrusage(RUSAGE_SELF).ru_maxrss`` of the worker, and of its largest child process (the
``datasets`` tokenizing workers) where there is one.

    python benchmarks/bench_data.py --sizes 10000 100000 1000000 --out data.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HH_TEST, REPO, TOKENIZER_DIR, current_rss_mb, markdown_table, peak_rss_mb, read_hh_rows, worker_env  # noqa: E402

TINY_LLAMA = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def write_rows(path: Path, n: int) -> Path:
    """``n`` HH rows (the test split repeated) as JSON lines; re-used when already written."""
    if path.exists() and sum(1 for _ in open(path, "rb")) == n:
        return path
    rows = [json.dumps(r) for r in read_hh_rows()]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(rows[i % len(rows)] + "\n")
    os.replace(tmp, path)
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    return tok


def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


# --- workers ---------------------------------------------------------------------------------------
def preftune_worker(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from preftune.config import DataArguments
    from preftune.data.splits import prepare_data
    from preftune.layout import PreferenceCollator
    from preftune.reliability import largest_batch
    from preftune.trainer import PairDataset

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer()
    base_rss = current_rss_mb()
    started = time.perf_counter()
    args = DataArguments(dataset_name=[spec["data"]], on_bad_row="skip", dataset_num_proc=spec["num_proc"],
                         dataset_cache_dir=spec["cache_dir"], max_length=1024, max_prompt_length=512)
    data = prepare_data(tok, args, seed=42)
    prepared = time.perf_counter()
    largest_batch(data.train_pairs, 4)  # what the memory preflight picks before step 1
    loader = DataLoader(PairDataset(data.train_pairs), batch_size=4, shuffle=True, collate_fn=PreferenceCollator(pad_id=tok.pad_token_id))
    next(iter(loader))
    first_batch = time.perf_counter()
    out = {"pairs": len(data.train_pairs), "prepare_s": prepared - started, "data_s": first_batch - started, "base_rss_mb": base_rss,
           "data_peak_rss_mb": peak_rss_mb(), "child_peak_rss_mb": children_peak_mb(), "from_cache": all(s["cached"] for s in data.sources),
           "held_rss_mb": current_rss_mb() - base_rss}
    if spec.get("train_steps"):
        from preftune.config import PreftuneConfig
        from preftune.trainer import PreferenceTrainer

        targs = PreftuneConfig(output_dir=spec["out_dir"], max_steps=spec["train_steps"], per_device_train_batch_size=4, learning_rate=1e-4,
                               logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                               bf16="false")  # fp32, as measured in docs/benchmarks.md (auto would pick bf16 on AVX512-BF16 CPUs)
        trainer = PreferenceTrainer(model=tiny_model(), args=targs, train_pairs=data.train_pairs, processing_class=tok)
        t = time.perf_counter()
        trainer.train()
        out.update(train_s=time.perf_counter() - t, train_peak_rss_mb=peak_rss_mb())
    return out


def trl_worker(spec: dict) -> dict:
    import datasets
    import torch
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer()
    model = tiny_model()
    base_rss = current_rss_mb()
    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache_dir"])
    targs = ORPOConfig(output_dir=spec["out_dir"], max_length=1024, dataset_num_proc=spec["num_proc"], per_device_train_batch_size=4,
                       report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no")
    trainer = ORPOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok)
    prepared = time.perf_counter()
    next(iter(trainer.get_train_dataloader()))
    first_batch = time.perf_counter()
    return {"pairs": len(trainer.train_dataset), "prepare_s": prepared - started, "data_s": first_batch - started, "base_rss_mb": base_rss,
            "data_peak_rss_mb": peak_rss_mb(), "child_peak_rss_mb": children_peak_mb()}


def legacy_worker(spec: dict) -> dict:
    sys.path.insert(0, spec["legacy_src"])
    from preftune.data import load_examples
    from preftune.data.tokenize import TokenizeSettings, tokenize_examples

    tok = load_tokenizer()
    base_rss = current_rss_mb()
    started = time.perf_counter()
    loaded = load_examples(spec["data"], on_bad_row="skip")
    pairs, _ = tokenize_examples(tok, loaded.examples, TokenizeSettings(max_length=1024, max_prompt_length=512))
    done = time.perf_counter()
    return {"pairs": len(pairs), "prepare_s": done - started, "data_s": done - started, "base_rss_mb": base_rss,
            "data_peak_rss_mb": peak_rss_mb(), "rss_after_mb": current_rss_mb(), "child_peak_rss_mb": children_peak_mb()}


WORKERS = {"preftune": preftune_worker, "trl": trl_worker, "legacy": legacy_worker}


def run_worker(role: str, spec: dict, tmp: Path) -> dict:
    spec_path, result_path = tmp / f"{role}-spec.json", tmp / f"{role}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_env(spec["threads"])
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", role, "--spec", str(spec_path), "--result", str(result_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": time.perf_counter() - started}
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


# --- driver ----------------------------------------------------------------------------------------
def bench_size(n: int, ns, work: Path) -> dict:
    data = write_rows(work / f"hh-{n}.jsonl", n)
    res: dict = {"pairs_in_file": n}
    base = {"data": str(data), "threads": ns.threads, "num_proc": ns.num_proc}
    if "preftune" in ns.tools:
        cache = work / f"preftune-cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        spec = {**base, "cache_dir": str(cache), "out_dir": str(work / "out")}
        res["preftune_first"] = run_worker("preftune", spec, work)
        res["preftune_cached"] = run_worker("preftune", {**spec, "train_steps": ns.train_steps}, work)
        print(f"[{n}] preftune first {res['preftune_first'].get('data_s')}, cached {res['preftune_cached'].get('data_s')}", file=sys.stderr)
    if "trl" in ns.tools and n <= ns.trl_max_pairs:
        cache = work / f"trl-cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        spec = {**base, "cache_dir": str(cache), "out_dir": str(work / "out")}
        res["trl_first"] = run_worker("trl", spec, work)
        res["trl_cached"] = run_worker("trl", spec, work)
        print(f"[{n}] trl first {res['trl_first'].get('data_s')}, cached {res['trl_cached'].get('data_s')}", file=sys.stderr)
    if ns.legacy_src and n <= ns.legacy_max_pairs:
        res["legacy"] = run_worker("legacy", {**base, "legacy_src": ns.legacy_src}, work)
    return res


def report(results: dict) -> str:
    g = lambda r, k: r.get(k, float("nan")) if r and "error" not in r else float("nan")  # noqa: E731
    rows = []
    for n, res in results.items():
        p1, p2 = res.get("preftune_first", {}), res.get("preftune_cached", {})
        if p1 or p2:
            rows.append([f"{int(n):,}", "preftune", g(p1, "data_s"), g(p1, "data_peak_rss_mb"), g(p1, "child_peak_rss_mb"), g(p2, "data_s"),
                         g(p2, "data_peak_rss_mb"), g(p2, "held_rss_mb"), g(p2, "train_peak_rss_mb")])
        t1, t2 = res.get("trl_first", {}), res.get("trl_cached", {})
        if t1 or t2:
            rows.append([f"{int(n):,}", "TRL 1.16 ORPO", g(t1, "data_s"), g(t1, "data_peak_rss_mb"), g(t1, "child_peak_rss_mb"), g(t2, "data_s"),
                         g(t2, "data_peak_rss_mb"), float("nan"), float("nan")])
        lg = res.get("legacy")
        if lg:
            rows.append([f"{int(n):,}", "preftune before (lists)", g(lg, "data_s"), g(lg, "data_peak_rss_mb"), float("nan"), g(lg, "data_s"),
                         g(lg, "data_peak_rss_mb"), g(lg, "rss_after_mb") - g(lg, "base_rss_mb"), float("nan")])
    headers = ["pairs", "tool", "first run s", "first run peak MB", "largest worker MB", "cached run s (data time to step 1)",
               "cached run peak MB", "RSS held by the data MB", "training peak MB"]
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="pairs per file")
    p.add_argument("--tools", nargs="+", default=["preftune", "trl"], choices=["preftune", "trl"], help="tools to run")
    p.add_argument("--num_proc", type=int, default=2, help="tokenizing processes, both tools (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--train_steps", type=int, default=3, help="optimizer steps in preftune's cached run (0: none)")
    p.add_argument("--trl_max_pairs", type=int, default=10**9, help="skip TRL above this size")
    p.add_argument("--legacy_src", default=None, help="a source tree of the pre-cache preftune (see the module docstring)")
    p.add_argument("--legacy_max_pairs", type=int, default=200_000, help="skip the legacy path above this size (it holds every pair in memory)")
    p.add_argument("--workdir", default=None, help="where data files and caches go (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="write every number as JSON here")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        spec = json.loads(Path(ns.spec).read_text())
        Path(ns.result).write_text(json.dumps(WORKERS[ns.worker](spec)))
        return 0
    if not HH_TEST.exists():
        raise SystemExit(f"benchmark data not found: {HH_TEST}")
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="preftune-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = {n: bench_size(n, ns, work) for n in ns.sizes}
    finally:
        if not ns.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if ns.out:
        Path(ns.out).write_text(json.dumps({"results": results, "args": vars(ns)}, indent=1))
    failed = [f"{n} {k}" for n, r in results.items() for k, v in r.items() if isinstance(v, dict) and "error" in v]
    for f in failed:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
