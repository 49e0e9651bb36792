"""How fast each ``--linear_kernel`` runs linear layers on this machine (one process, preftune only).

    python benchmarks/linear_kernels.py                       # shapes, then fp32 and bf16 decoder A/Bs
    python benchmarks/linear_kernels.py --model tiny --rounds 2   # a quick check

Two measurements, the evidence behind ``preftune/linear_kernel.py``:

* **shapes**: GFLOP/s of ``F.linear`` (MKL's ``sgemm`` with a transposed ``B`` on a CPU) and of
  oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``) at the model's projection shapes and its
  LM-head chunk, float32, best of ``--repeats``;
* **decoder**: forward + backward of the benchmark model's decoder (LoRA r=16 on every
  projection, as ``bench_user.py`` trains it) over ``--lengths`` tokens, with the kernels
  alternated round by round in this one process (the machine's speed drifts over minutes, so
  separate processes cannot compare a few percent): float32 ``default`` against ``onednn``, and
  under bf16 autocast ``default`` against ``cast_once`` (frozen weights cast once). Prints each
  round's seconds and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402


def shape_rates(hidden: int, intermediate: int, kv: int, vocab: int, tokens: int, repeats: int) -> list[tuple]:
    """(name, F.linear GFLOP/s, oneDNN GFLOP/s) per projection shape and the LM-head chunk."""
    import torch
    import torch.nn.functional as F

    from preftune.linear_kernel import linear, onednn_available

    shapes = [("q/o", hidden, hidden), ("k/v", hidden, kv), ("gate/up", hidden, intermediate), ("down", intermediate, hidden),
              ("LM head, 256-row chunk", hidden, vocab)]
    out = []
    for name, d_in, d_out in shapes:
        rows = 256 if "head" in name else tokens
        x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in) * d_in**-0.5
        flops = 2 * rows * d_in * d_out

        def best(fn):
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return flops / min(times) / 1e9

        with torch.no_grad():
            out.append((name, best(lambda: F.linear(x, w)), best(lambda: linear(x, w)) if onednn_available() else float("nan")))
    return out


def decoder_ab(model_name: str, lengths: list[int], rounds: int, precision: str) -> dict[str, list[float]]:
    """Seconds per round (forward + backward over ``lengths``) of each kernel, alternated."""
    import torch
    from peft import LoraConfig, get_peft_model

    from preftune.linear_kernel import disable_linear_kernel, enable_linear_kernel

    torch.manual_seed(0)
    model = models.MODELS[model_name].build().float()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=models.LORA_TARGETS, lora_dropout=0.0))
    decoder = model.base_model.model.model
    kernels = ("default", "onednn") if precision == "fp32" else ("default", "cast_once")
    vocab = model.config.vocab_size

    def one_round():
        start = time.perf_counter()
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                hidden = decoder(input_ids=ids).last_hidden_state
            hidden.float().pow(2).mean().backward()
        return time.perf_counter() - start

    seconds = {k: [] for k in kernels}
    for r in range(rounds + 1):
        for kernel in kernels if r % 2 == 0 else kernels[::-1]:
            disable_linear_kernel(model)
            enable_linear_kernel(model, kernel)
            took = one_round()
            if r:  # round 0 warms both up
                seconds[kernel].append(took)
        if r:
            print(f"  round {r}: " + ", ".join(f"{k} {seconds[k][-1]:.2f} s" for k in kernels), flush=True)
    disable_linear_kernel(model)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=tuple(models.MODELS), default="qwen2-0.5b")
    p.add_argument("--tokens", type=int, default=609, help="rows of the projection shapes")
    p.add_argument("--lengths", default="413,560,700,480", help="token counts of one decoder round")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds per decoder A/B")
    p.add_argument("--repeats", type=int, default=5, help="timings per shape (best kept)")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both", help="decoder A/Bs to run")
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args(argv)
    import torch

    torch.set_num_threads(ns.threads)
    c = models.param_counts(ns.model)
    print(f"## Linear kernels, {ns.model}, {ns.threads} threads\n\n| shape (in -> out) | F.linear GFLOP/s | oneDNN GFLOP/s |\n|---|---|---|")
    for name, plain, onednn in shape_rates(c["hidden"], c["intermediate"], c["kv"], c["vocab"], ns.tokens, ns.repeats):
        print(f"| {name} | {plain:.0f} | {onednn:.0f} |")
    lengths = [int(x) for x in ns.lengths.split(",")]
    for precision in ("fp32", "bf16") if ns.precision == "both" else (ns.precision,):
        print(f"\nDecoder forward + backward, LoRA r=16, {precision}, lengths {lengths}, alternated:", flush=True)
        seconds = decoder_ab(ns.model, lengths, ns.rounds, precision)
        print("  median: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
