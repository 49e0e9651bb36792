"""Loss trajectories of every preftune DPO loss type, option and KTO against TRL 1.16, step by step.

    python benchmarks/compare_losses_trl.py                  # every case, table on stdout
    python benchmarks/compare_losses_trl.py --out losses.json --cases sigmoid,kto
    python benchmarks/compare_losses_trl.py --list           # the case names

For each case both tools train the same tiny random-init Llama (saved once, loaded by both) on
the same preference pairs, the whole workload as one batch, for ``--steps`` optimizer steps with
a cosine schedule (AdamW, fp32, no dropout), and log the loss of every step. Both run in this
process, one after the other. The data are word-level texts over a vocabulary where every word is
one token, so TRL's own tokenization (it tokenizes text, with EOS appended as text) and
preftune's give the same ids; the script checks that they do, pair by pair, before training.

Reported per case: the loss at every step for both tools and the largest relative difference
``max_step |preftune - trl| / |trl|``. The target is 1e-3 at every step.

preftune side: ``PreferenceTrainer`` with its default packed (prefix-shared) layout and the
reference from ``build_reference`` (a frozen copy of the starting policy). TRL side:
``DPOTrainer``/``KTOTrainer`` with ``ref_model`` = a second ``from_pretrained`` of the saved model.
Needs TRL 1.16 installed (``pip install --no-deps trl==1.16.0``, see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(60)]

# name -> (method, preftune/TRL settings shared by both tools). Each DPO loss type once, then the options.
CASES: dict[str, tuple[str, dict]] = {
    "sigmoid": ("dpo", {"loss_type": ["sigmoid"]}),
    "hinge": ("dpo", {"loss_type": ["hinge"]}),
    "ipo": ("dpo", {"loss_type": ["ipo"]}),
    "exo_pair": ("dpo", {"loss_type": ["exo_pair"], "label_smoothing": 1e-3}),
    "nca_pair": ("dpo", {"loss_type": ["nca_pair"]}),
    "robust": ("dpo", {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "bco_pair": ("dpo", {"loss_type": ["bco_pair"]}),
    "sppo_hard": ("dpo", {"loss_type": ["sppo_hard"]}),
    "aot": ("dpo", {"loss_type": ["aot"], "label_smoothing": 0.1}),
    "aot_unpaired": ("dpo", {"loss_type": ["aot_unpaired"]}),
    "apo_zero": ("dpo", {"loss_type": ["apo_zero"]}),
    "apo_down": ("dpo", {"loss_type": ["apo_down"]}),
    "discopop": ("dpo", {"loss_type": ["discopop"], "discopop_tau": 0.05}),
    "sigmoid_norm": ("dpo", {"loss_type": ["sigmoid_norm"]}),
    "sft": ("dpo", {"loss_type": ["sft"]}),
    "RPO sigmoid+sft 1.0/0.5": ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "MPO sigmoid+bco_pair+sft 0.8/0.2/1.0": ("dpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    "LD-DPO ld_alpha 0.5": ("dpo", {"loss_type": ["sigmoid"], "ld_alpha": 0.5}),
    "LD-DPO ld_alpha 0.5 ipo": ("dpo", {"loss_type": ["ipo"], "ld_alpha": 0.5}),
    "f-div forward_kl": ("dpo", {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}),
    "f-div js_divergence": ("dpo", {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}),
    "f-div alpha_divergence 0.3": ("dpo", {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    "WPO use_weighting": ("dpo", {"loss_type": ["sigmoid"], "use_weighting": True}),
    # TRL 1.16 raises here (an in-place multiply of its expanded sft term); kept to show it
    "WPO sigmoid+sft": ("dpo", {"loss_type": ["sigmoid", "sft"], "use_weighting": True}),
    "TR-DPO sync every 2 steps alpha 0.6": ("dpo", {"loss_type": ["sigmoid"], "sync_ref_model": True, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 2}),
    "kto": ("kto", {"loss_type": "kto"}),
    "kto weights 1.0/1.33": ("kto", {"loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.33}),
    "apo_zero_unpaired": ("kto", {"loss_type": "apo_zero_unpaired"}),
}


def build_tokenizer():
    """A word-level fast tokenizer over :data:`VOCAB` that adds BOS (one word = one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_rows(n_pairs: int, seed: int) -> list[dict]:
    """Preference rows of random words; completions end in a space so TRL's appended EOS is its own word."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(f"t{rng.randrange(60)}" for _ in range(rng.randint(lo, hi)))

    rows = []
    while len(rows) < n_pairs:
        chosen, rejected = words(2, 9), words(2, 9)
        if chosen != rejected:
            rows.append({"prompt": words(3, 10), "chosen": f" {chosen} ", "rejected": f" {rejected} "})
    return rows


def save_model(folder: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, attention_dropout=0.0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(folder))


def load_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")


def common_training(ns, out: Path, batch: int) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=batch, max_steps=ns.steps, learning_rate=ns.lr, lr_scheduler_type="cosine",
                warmup_steps=0, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                seed=0, disable_tqdm=True, use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0)


def losses_of(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def run_trl(method: str, settings: dict, rows: list[dict], model_dir: Path, ns, out: Path):
    from datasets import Dataset

    tok = build_tokenizer()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common_training(ns, out, len(rows)), beta=ns.beta, max_length=None, **settings)
        trainer = DPOTrainer(model=load_model(model_dir), ref_model=load_model(model_dir), args=config,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
        ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    else:
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(**common_training(ns, out, 2 * len(rows)), beta=ns.beta, max_length=None, **settings)
        trainer = KTOTrainer(model=load_model(model_dir), ref_model=load_model(model_dir), args=config,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
        ids = [(r["prompt_ids"], r["completion_ids"], r.get("KL_completion_ids", []), bool(r["label"])) for r in trainer.train_dataset]
    trainer.train()
    return losses_of(trainer), ids


def run_preftune(method: str, settings: dict, rows: list[dict], model_dir: Path, ns, out: Path):
    from types import SimpleNamespace

    from preftune.config import ModelArguments, PreftuneConfig
    from preftune.data.formats import ColumnMap, normalize_record
    from preftune.data.io import Record
    from preftune.data.splits import tokenize_split
    from preftune.data.tokenize import TokenizeSettings
    from preftune.methods import Hyperparameters, get_method
    from preftune.reference import build_reference
    from preftune.trainer import PreferenceTrainer
    from preftune.training_model import choose_device

    batch = len(rows) * (2 if method == "kto" else 1)
    # bf16=False kept: preftune's default is --bf16 auto, and both tools must run fp32 here
    training = {k: v for k, v in common_training(ns, out, batch).items() if k != "gradient_checkpointing"}
    args = PreftuneConfig(**training, method=method, beta=ns.beta, memory_preflight=False, **settings)
    examples = [normalize_record(Record(r, f"row {i}"), ColumnMap(), i) for i, r in enumerate(rows)]
    spec = get_method(method)  # KTO: labelled examples with KL completions from groups of one batch
    kl_group = batch if spec.mismatched_completions(Hyperparameters.from_config(args)) else None
    settings = TokenizeSettings(max_length=None, max_prompt_length=None, chat_template="never")
    pairs, _ = tokenize_split(build_tokenizer(), examples, settings, "train", unpaired=spec.unpaired, kl_group=kl_group)
    model = load_model(model_dir)
    reference = build_reference(model, ModelArguments(), args, choose_device("float32", "sdpa"), pairs, [], SimpleNamespace(pad_token_id=0))
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, reference=reference, pad_token_id=0)
    trainer.train()
    if method == "kto":
        ids = [(p.prompt, p.chosen, p.rejected, p.label) for p in pairs]
    else:
        ids = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    return losses_of(trainer), ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs in the workload, all in one batch (default 16; KTO: 2x examples)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the cosine schedule (default 1e-3)")
    p.add_argument("--beta", type=float, default=0.1, help="beta for every case (default 0.1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all; --list shows them)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference accepted at any step (default 1e-3); exit 1 above it")
    ns = p.parse_args(argv)
    if ns.list:
        print("\n".join(CASES))
        return 0
    names = [c.strip() for c in ns.cases.split(",")] if ns.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; see --list")

    import torch
    import transformers
    import trl

    torch.set_num_threads(ns.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    rows = build_rows(ns.pairs, seed=0)
    results = []
    with tempfile.TemporaryDirectory(prefix="preftune-compare-losses-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        save_model(model_dir, seed=0)
        for name in names:
            method, settings = CASES[name]
            started = time.perf_counter()
            ours, our_ids = run_preftune(method, settings, rows, model_dir, ns, tmp / "preftune")
            try:
                trl_losses, trl_ids = run_trl(method, settings, rows, model_dir, ns, tmp / "trl")
            except Exception as e:  # a TRL bug: recorded, and the case cannot be compared
                results.append({"case": name, "method": method, "settings": settings, "preftune": ours, "trl_error": f"{type(e).__name__}: {e}"})
                print(f"{name:<30} TRL failed: {type(e).__name__}: {str(e)[:150]}", flush=True)
                continue
            same_ids = sorted(map(repr, trl_ids)) == sorted(map(repr, our_ids)) if method == "kto" else trl_ids == our_ids
            rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, trl_losses)]
            results.append({"case": name, "method": method, "settings": settings, "same_token_ids": same_ids, "examples": len(our_ids),
                            "preftune": ours, "trl": trl_losses, "max_rel_diff": max(rel) if rel else float("nan"),
                            "seconds": round(time.perf_counter() - started, 1)})
            r = results[-1]
            print(f"{name:<30} ids {'same' if same_ids else 'DIFFERENT'}  max rel diff {r['max_rel_diff']:.2e}  "
                  f"loss {ours[0]:.6f} -> {ours[-1]:.6f} (trl {trl_losses[0]:.6f} -> {trl_losses[-1]:.6f})  {r['seconds']} s", flush=True)
    print()
    print(f"preftune vs TRL {trl.__version__} (torch {torch.__version__}, transformers {transformers.__version__}): {ns.pairs} pairs in one batch, "
          f"{ns.steps} steps, AdamW lr {ns.lr:g} cosine, beta {ns.beta:g}, fp32, {ns.threads} threads\n")
    print("| case | same token ids | max rel. diff | loss step 1 (preftune / TRL) | loss step %d (preftune / TRL) |" % ns.steps)
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        if "trl_error" in r:
            print(f"| {r['case']} | - | TRL fails: {r['trl_error'][:90]} | {r['preftune'][0]:.6f} / - | {r['preftune'][-1]:.6f} / - |")
            continue
        print(f"| {r['case']} | {'yes' if r['same_token_ids'] else 'NO'} | {r['max_rel_diff']:.1e} | {r['preftune'][0]:.6f} / {r['trl'][0]:.6f} | "
              f"{r['preftune'][-1]:.6f} / {r['trl'][-1]:.6f} |")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"steps": ns.steps, "pairs": ns.pairs, "lr": ns.lr, "beta": ns.beta, "trl": trl.__version__,
                                            "results": results}, indent=1))
    bad = [r["case"] for r in results if "trl_error" not in r and (not r["same_token_ids"] or not r["max_rel_diff"] <= ns.tolerance)]
    if bad:
        print(f"\nabove tolerance {ns.tolerance:g} or different ids: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
