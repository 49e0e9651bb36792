"""One training run, from configuration to a saved, aligned model (what ``preftune train`` does)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path


from .config import DataArguments, ModelArguments, PreftuneConfig
from .data.splits import data_from_examples, prepare_data, tokenize_settings_of
from .errors import PreftuneError
from .model_hooks import model_hooks_for
from .training_model import apply_peft, choose_device, load_model, load_tokenizer
from .outputs import MetricsFileCallback, plot_training_curves, write_model_card
from .reliability import CheckpointMarkerCallback, InterruptCallback
from .rundir import REFT_CONFIG_FILE, REFT_WEIGHTS_FILE, RUN_COMPLETE_FILE, RUN_CONFIG_FILE, check_output_dir, find_latest_checkpoint, resolve_resume, write_json
from .trainer import PreferenceTrainer

logger = logging.getLogger("preftune")

__all__ = ["run_training", "RunResult", "RunInterrupted"]


class RunInterrupted(PreftuneError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class RunResult:
    output_dir: Path
    final_metrics: dict
    train_pairs: int
    eval_pairs: int
    seconds: float
    demo_table: list[tuple[str, float, float]] | None = None


def _hyperparameters(args: PreftuneConfig, data_args: DataArguments) -> dict:
    keys = ["method", "beta", "learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "optim", "seed", "batch_layout", "nll_on_prompt"]
    out = {k: getattr(args, k) for k in keys}
    out["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    out["optim"] = str(getattr(args.optim, "value", args.optim))
    if args.method == "dpo":
        out["loss_type"] = args.loss_type
    if args.method == "simpo":
        out["simpo_gamma"] = args.simpo_gamma
    out.update(max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length)
    return out


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    out = {}
    for k, v in obj.items():
        if k.startswith("_"):
            continue
        v = getattr(v, "value", v)
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool, dict)) for x in v):
            out[k] = list(v)  # incl. a datasets: mixture (a list of plain mappings)
        else:
            out[k] = str(v)
    return out


def _configure_logging(args: PreftuneConfig):
    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("preftune").setLevel(level)


def run_training(model_args: ModelArguments, data_args: DataArguments, args: PreftuneConfig) -> RunResult:
    """Run one training job; returns where it saved and its final metrics."""
    _configure_logging(args)
    started = time.perf_counter()
    from transformers import set_seed

    set_seed(args.seed)  # before any random init (demo model, LoRA/ReFT weights): same seed, same run
    is_demo = model_args.is_demo
    if is_demo and data_args.has_data:
        raise PreftuneError("--dataset_name needs --model_name_or_path (run `preftune train` with neither for the built-in demo)")
    if not is_demo and not data_args.has_data:
        raise PreftuneError("--model_name_or_path needs --dataset_name (a preference data file or folder)")
    resuming = bool(args.resume_from_checkpoint)
    out = check_output_dir(args.output_dir, args.overwrite_output_dir, resuming, is_demo) if args.process_index == 0 else Path(args.output_dir)
    choice = choose_device(model_args.torch_dtype, model_args.attn_implementation, args.batch_layout)
    logger.info("preftune: %s", choice.describe())
    from .quant import check_bitsandbytes

    check_bitsandbytes(model_args, args, args.device.type)  # 4/8-bit and 8-bit optimizers work here, or one clear line

    demo_eval_rows = None
    if is_demo:
        from .demo import build_demo_model, build_demo_tokenizer, demo_examples

        tokenizer = build_demo_tokenizer()
        train_ex, eval_ex, demo_eval_rows = demo_examples()
        data = data_from_examples(tokenizer, train_ex, eval_ex, tokenize_settings_of(data_args), "built-in demo task (add one / copy)")
    else:
        tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path, model_args.trust_remote_code, model_args.chat_template_file)
        with args.main_process_first(desc="tokenizing the data"):  # DDP: process 0 fills the tokenized cache, the others read it
            data = prepare_data(tokenizer, data_args, args.seed)
    train_pairs, eval_pairs, dataset_label = data.train, data.eval, data.label

    if is_demo:
        model = build_demo_model(len(tokenizer), seed=args.seed)
    else:
        model = load_model(model_args.model_name_or_path, model_args, choice)
    if args.gradient_checkpointing:
        args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    saved_kind = "full model"
    if model_args.use_peft:
        model = apply_peft(model, model_args, args.gradient_checkpointing)
        saved_kind = "LoRA adapter (load with peft, or merge with `preftune merge`)"
    if model_args.reft_layers:
        from .reft import attach_reft

        model = attach_reft(model, model_args)
        saved_kind = f"ReFT interventions ({REFT_WEIGHTS_FILE} + {REFT_CONFIG_FILE})"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100.0 * trainable / max(total, 1))

    reference = None
    if args.needs_reference:
        from .reference import build_reference

        reference = build_reference(model, model_args, args, choice, train_pairs, eval_pairs, tokenizer)

    demo_before = None
    if is_demo:
        from .demo import evaluate_demo

        demo_before = evaluate_demo(model, tokenizer, demo_eval_rows, eval_pairs, model_hooks_for(model))

    interrupt = InterruptCallback()
    trainer = PreferenceTrainer(
        model=model, args=args, train_pairs=train_pairs, eval_pairs=eval_pairs, processing_class=tokenizer,
        reference=reference, callbacks=[MetricsFileCallback(str(out)), CheckpointMarkerCallback(), interrupt],
    )
    if args.process_index == 0:
        write_json(out / RUN_CONFIG_FILE, {
            "model": _jsonable(model_args), "data": _jsonable(data_args), "training": _jsonable(args.to_dict()),
            "base_model": model_args.model_name_or_path or "built-in demo model", "dataset": dataset_label,
            "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "demo": is_demo, "data_sources": data.sources,
        })
    train_output = trainer.train(resume_from_checkpoint=resolve_resume(args.resume_from_checkpoint, out))
    if interrupt.received is not None:
        import signal

        latest = find_latest_checkpoint(out)
        where = f"checkpoint saved to {latest}" if latest else "no checkpoint could be saved"
        raise RunInterrupted(
            f"interrupted by {signal.Signals(interrupt.received).name} at step {trainer.state.global_step}; {where}. "
            f"Resume with: preftune train ... --resume_from_checkpoint latest",
            interrupt.received,
        )
    final = {k: v for k, v in train_output.metrics.items()}
    last = {}
    for rec in trainer.state.log_history:
        last.update({k: v for k, v in rec.items() if isinstance(v, (int, float))})
    for k in ("loss", "nll_loss", "rewards/margins", "rewards/accuracies", "log_odds_chosen", "tokens_per_second"):
        if k in last:
            final[k] = last[k]
    if eval_pairs:
        final.update(trainer.evaluate())

    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
    demo_table = None
    if is_demo:
        from .demo import evaluate_demo

        after = evaluate_demo(trainer.model, tokenizer, demo_eval_rows, eval_pairs, trainer.hooks)
        demo_table = [(k, demo_before[k], after[k]) for k in demo_before]
        final.update({f"demo_{k}": v for k, v in after.items()})
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        plot_training_curves(out)
        write_model_card(out, {
            "method": args.method, "base_model": model_args.model_name_or_path or "built-in demo model (random init)",
            "dataset": dataset_label, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "saved": saved_kind,
            "data_sources": data.sources,
            "hyperparameters": _hyperparameters(args, data_args), "final_metrics": final,
        })
        write_json(out / RUN_COMPLETE_FILE, {"final_metrics": final, "seconds": seconds, "demo": is_demo})
    return RunResult(out, final, len(train_pairs), len(eval_pairs), seconds, demo_table)
