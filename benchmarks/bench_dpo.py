"""DPO benchmark: preftune (``method=dpo``) vs TRL 1.16's ``DPOTrainer``.

    python benchmarks/bench_dpo.py                       # the full benchmark (8 steps, max_length 512)
    python benchmarks/bench_dpo.py --sweep               # plus peak RSS at max_length 256..2048
    python benchmarks/bench_dpo.py --steps 2 --max_length 128 --pairs 8 --no_floor   # smoke run

Same workload and hyper-parameters as bench_orpo.py; loss ``sigmoid``, beta 0.1, and for both
tools the reference is a separate frozen copy of the initial model (loaded from the same saved
folder). At step 1 policy = reference, so both losses are exactly log 2; the check that carries
information is the agreement of the first-step policy log-probs (``logps/chosen``,
``logps/rejected``: summed over completion tokens, mean over pairs, in both tools).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def make_reference(model, model_args, args, choice, pairs, tokenizer, spec):
    """preftune's own ``build_reference`` when it exists (``--reference auto|preftune``), else a
    frozen copy run through ``preftune.engine.sequence_logps`` under ``torch.no_grad``."""
    mode = spec["reference"]
    why = "--reference harness"
    if mode in ("auto", "preftune"):
        try:
            from preftune.reference import build_reference
        except ImportError:
            if mode == "preftune":
                raise
            why = "preftune.reference not available"
        else:
            ref = build_reference(model, model_args, args, choice, pairs, [], tokenizer)
            return ref, f"preftune.reference.build_reference: {getattr(ref, 'description', type(ref).__name__)}"
    import torch
    from preftune.engine import sequence_logps
    from preftune.training_model import load_model

    frozen = load_model(spec["model_dir"], model_args, choice)
    frozen.eval()
    frozen.requires_grad_(False)
    chunk = args.logprob_chunk_size

    def reference(policy, batch):
        with torch.no_grad():
            seq = sequence_logps(frozen, batch, chunk_size=chunk)
        return seq.chosen_sum, seq.rejected_sum

    return reference, f"benchmark harness: frozen copy of the initial model through preftune.engine.sequence_logps ({why})"


def preftune_worker(spec: dict) -> dict:
    return common.preftune_worker(spec, "dpo", make_reference)


def trl_worker(spec: dict) -> dict:
    """TRL's DPOTrainer with an explicit frozen ``ref_model`` (with LoRA: none, so the reference is
    the base model with the adapters disabled, as in preftune), given the raw strings."""
    common.setup_worker(spec)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = common.load_tokenizer(spec["model_dir"])  # DPOTrainer sets pad = eos itself

    def load():
        return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")

    lora = spec["lora_r"] > 0
    model, ref_model = load(), (None if lora else load())
    config = DPOConfig(
        **common.training_kwargs(spec, "trl"),
        max_length=spec["max_length"],
        truncation_mode="keep_start",
        beta=spec["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
    )

    def fingerprint(batch):
        seq = batch["attention_mask"].sum(1).tolist()
        half = len(seq) // 2
        return list(zip(seq[:half], seq[half:]))

    timer = common.step_timer()
    trainer = common.instrument(DPOTrainer, fingerprint)(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_list(common.read_jsonl(spec["data_file"])),
        processing_class=tok,
        callbacks=[timer],
        peft_config=common.lora_config(spec) if lora else None,
    )
    length = spec["max_length"]
    found = [((r["prompt_ids"] + r["chosen_ids"])[:length], (r["prompt_ids"] + r["rejected_ids"])[:length], len(r["prompt_ids"]))
             for r in trainer.train_dataset]
    ids_check = common.compare_ids(found, spec["expected_ids"])
    trainer.train()
    ref = "the policy with its LoRA adapters disabled" if lora else "separate frozen ref_model (from_pretrained of the saved initial model)"
    return common.finish_worker(trainer, timer, spec, {"ids_check": ids_check, "reference": ref})


BENCH = common.Benchmark(
    name="DPO",
    trl_trainer="DPOTrainer (trl 1.16)",
    script=__file__,
    workers={"preftune": preftune_worker, "trl": trl_worker},
    scored_tokens=lambda pair: len(pair[1]) + len(pair[2]),  # completion tokens only
    reference=True,
    # TRL's fused LM head scores every position on CPU (it compacts to completion tokens only on
    # Triton devices) and recomputes each tile's logits in the backward
    trl_head_chunked=True,
    spec_extra={"nll_on_prompt": False},
    spec_args=("reference",),
    agreement_keys=("loss", "logps/chosen", "logps/rejected"),
    notes=["Both: loss sigmoid, beta 0.1, reference = separate frozen copy of the initial model, fused AdamW (adamw_torch_fused, transformers' default), "
           "constant lr, no dropout, no gradient checkpointing, sequential batches. Step-1 loss is log 2 by construction; "
           "the policy log-probs carry the check."],
)


def parser():
    p = common.base_parser("preftune vs TRL DPOTrainer benchmark")
    p.add_argument("--reference", choices=("auto", "preftune", "harness"), default="auto",
                   help="preftune's reference: auto = preftune.reference.build_reference if present, else the harness's frozen copy")
    return p


if __name__ == "__main__":
    sys.exit(common.main(BENCH, parser=parser()))
