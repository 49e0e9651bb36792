"""ORPO benchmark: preftune vs TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``.

    python benchmarks/bench_orpo.py                      # the full benchmark (8 steps, max_length 512)
    python benchmarks/bench_orpo.py --sweep              # plus peak RSS at max_length 256..2048
    python benchmarks/bench_orpo.py --steps 2 --max_length 128 --pairs 8 --no_floor   # smoke run

Each tool trains the same random-init Llama on the same HH-RLHF pairs in its own fresh process
(this script re-run with ``--worker``), with the same hyper-parameters; preftune with
``nll_on_prompt=True``, which is TRL's NLL (cross-entropy over prompt + chosen tokens, token mean
over the batch). The first-step losses must agree to 1e-4 relative. See docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def preftune_worker(spec: dict) -> dict:
    return common.preftune_worker(spec, "orpo")


def trl_worker(spec: dict) -> dict:
    """TRL's ORPOTrainer, given the raw strings: it tokenizes them itself (checked against the
    workload's ids below)."""
    common.setup_worker(spec)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = common.load_tokenizer(spec["model_dir"])
    tok.pad_token = tok.eos_token  # the Llama-2 tokenizer has none; TRL's collator needs one (preftune does the same)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    config = ORPOConfig(**common.training_kwargs(spec, "trl"), max_length=spec["max_length"], beta=spec["beta"])

    def fingerprint(batch):
        return list(zip(batch["chosen_attention_mask"].sum(1).tolist(), batch["rejected_attention_mask"].sum(1).tolist()))

    timer = common.step_timer()
    trainer = common.instrument(ORPOTrainer, fingerprint)(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(common.read_jsonl(spec["data_file"])),
        processing_class=tok,
        callbacks=[timer],
        peft_config=common.lora_config(spec) if spec["lora_r"] else None,
    )
    found = []
    for row in trainer.train_dataset:
        n_c = sum(1 for x in row["chosen_labels"] if x == -100)
        n_r = sum(1 for x in row["rejected_labels"] if x == -100)
        found.append((row["chosen_input_ids"], row["rejected_input_ids"], n_c if n_c == n_r else -1))
    ids_check = common.compare_ids(found, spec["expected_ids"])
    trainer.train()
    return common.finish_worker(trainer, timer, spec, {"ids_check": ids_check})


BENCH = common.Benchmark(
    name="ORPO",
    trl_trainer="ORPOTrainer (trl.experimental.orpo, 1.16)",
    script=__file__,
    workers={"preftune": preftune_worker, "trl": trl_worker},
    # preftune scores, per pair: prompt tokens after the first (chosen NLL), chosen and rejected
    scored_tokens=lambda pair: len(pair[0]) - 1 + len(pair[1]) + len(pair[2]),
    reference=False,
    spec_extra={"nll_on_prompt": True},
    agreement_keys=("loss", "nll_loss", "logps/chosen", "logps/rejected", "log_odds_chosen"),
    notes=["Both: beta 0.1, fused AdamW (adamw_torch_fused, transformers' default), constant lr, no dropout, sequential batches; "
           "preftune with nll_on_prompt=True (TRL's NLL: prompt + chosen tokens)."],
)

if __name__ == "__main__":
    sys.exit(common.main(BENCH))
