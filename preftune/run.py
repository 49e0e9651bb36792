"""One training run, from configuration to a saved, aligned model (what ``preftune train`` does)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path


from .config import DataArguments, ModelArguments, PreftuneConfig
from .data import ColumnMap, load_examples, split_eval
from .data.formats import normalize_record
from .data.io import Record
from .data.tokenize import TokenizeSettings, tokenize_examples
from .errors import PreftuneError
from .modeling import apply_peft, choose_device, load_model, load_tokenizer
from .outputs import MetricsFileCallback, plot_training_curves, write_model_card
from .reliability import CheckpointMarkerCallback, InterruptCallback, find_latest_checkpoint
from .trainer import PreferenceTrainer

logger = logging.getLogger("preftune")

__all__ = ["run_training", "RunResult", "RunInterrupted", "check_output_dir", "RUN_COMPLETE_FILE", "RUN_CONFIG_FILE"]

RUN_COMPLETE_FILE = "run_complete.json"
RUN_CONFIG_FILE = "run_config.json"


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


def check_output_dir(path: str, overwrite: bool, resuming: bool, is_demo: bool = False) -> Path:
    """Refuse unusable or finished output folders before any work is done."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"output_dir {str(out)!r} is a file, not a folder; choose another --output_dir")
    if (out / RUN_COMPLETE_FILE).exists() and not (overwrite or resuming):
        info = {}
        try:
            info = json.loads((out / RUN_COMPLETE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            pass
        if not (is_demo and info.get("demo")):
            raise PreftuneError(
                f"output_dir {str(out)!r} already holds a finished run; pass --overwrite_output_dir to replace it, or choose another --output_dir"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".preftune_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PreftuneError(f"cannot write to output_dir {str(out)!r}: {e.strerror or e}") from None
    return out


def _columns(data_args: DataArguments) -> ColumnMap:
    return ColumnMap(data_args.prompt_column, data_args.chosen_column, data_args.rejected_column, data_args.system_column,
                     data_args.completion_column, data_args.label_column)


def load_train_eval(data_args: DataArguments, args: PreftuneConfig):
    """Training and held-out examples exactly as a run splits them (also used by ``preftune eval``)."""
    from .methods import get_method

    unpaired = get_method(args.method).unpaired
    loaded = load_examples(
        data_args.dataset_name, data_args.dataset_split, _columns(data_args), data_args.on_bad_row, data_args.dataset_format, unpaired=unpaired
    )
    if loaded.skipped:
        logger.warning("%s: %s", data_args.dataset_name, loaded.skip_summary())
    train = loaded.examples
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    evals: list = []
    if data_args.eval_fraction:
        train, evals = split_eval(train, data_args.eval_fraction, args.seed)
    elif data_args.eval_split:
        is_path = Path(data_args.eval_split).expanduser().exists()
        source = data_args.eval_split if is_path else data_args.dataset_name
        split = "train" if is_path else data_args.eval_split
        ev = load_examples(source, split, _columns(data_args), data_args.on_bad_row, data_args.dataset_format, id_offset=10**9, unpaired=unpaired)
        evals = ev.examples
    return train, evals, loaded


def demo_data():
    """The built-in demo's training and held-out examples, and the held-out raw rows."""
    from .demo import demo_rows

    train_rows, eval_rows = demo_rows()
    columns = ColumnMap()
    train = [normalize_record(Record(r, f"demo row {i}"), columns, i) for i, r in enumerate(train_rows)]
    evals = [normalize_record(Record(r, f"demo eval row {i}"), columns, 10**9 + i) for i, r in enumerate(eval_rows)]
    return train, evals, eval_rows


def _tokenize(tokenizer, examples, data_args: DataArguments, label: str, args: PreftuneConfig | None = None):
    """Tokenized pairs; for an unpaired method (``args``), labelled examples with their KL completions."""
    from .methods import Hyperparameters, get_method

    settings = TokenizeSettings(
        max_length=data_args.max_length,
        max_prompt_length=data_args.max_prompt_length,
        truncation_mode=data_args.truncation_mode,
        chat_template=data_args.chat_template,
    )
    spec = get_method(args.method) if args is not None else None
    try:
        if spec is not None and spec.unpaired:
            from .data.unpaired import tokenize_unpaired

            kl_group = args.per_device_train_batch_size if spec.mismatched_completions(Hyperparameters.from_config(args)) else None
            pairs, report = tokenize_unpaired(tokenizer, examples, settings, kl_group)
        else:
            pairs, report = tokenize_examples(tokenizer, examples, settings)
    except ValueError as e:
        raise PreftuneError(f"{label}: {e}") from None
    logger.info("%s: %s", label, report.summary())
    if not pairs and examples:
        raise PreftuneError(f"{label}: every example was dropped during tokenization ({report.summary()}); raise --max_length")
    if spec is not None and spec.mismatched_completions(Hyperparameters.from_config(args)) and len(pairs) == 1:
        raise PreftuneError(f"{label}: one example left after tokenization; --method {spec.name}'s KL term needs at least two "
                            "(each example is scored with another example's completion)")
    return pairs, report


def _hyperparameters(args: PreftuneConfig, data_args: DataArguments) -> dict:
    from .methods import get_method

    keys = ["method", *get_method(args.method).hyperparameters, "learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs",
            "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "optim", "seed", "batch_layout",
            "nll_on_prompt"]
    out = {k: getattr(args, k) for k in keys}
    out.update({k: " ".join(map(str, v)) for k, v in out.items() if isinstance(v, list)})  # loss_type, loss_weights
    out["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    out["optim"] = str(getattr(args.optim, "value", args.optim))
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
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
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
    if is_demo and data_args.dataset_name:
        raise PreftuneError("--dataset_name needs --model_name_or_path (run `preftune train` with neither for the built-in demo)")
    if not is_demo and not data_args.dataset_name:
        raise PreftuneError("--model_name_or_path needs --dataset_name (a preference data file or folder)")
    resuming = bool(args.resume_from_checkpoint)
    out = check_output_dir(args.output_dir, args.overwrite_output_dir, resuming, is_demo) if args.process_index == 0 else Path(args.output_dir)
    choice = choose_device(model_args.torch_dtype, model_args.attn_implementation, args.batch_layout)
    logger.info("preftune: %s", choice.describe())
    from .quant import check_bitsandbytes

    check_bitsandbytes(model_args, args, args.device.type)  # 4/8-bit and 8-bit optimizers work here, or one clear line

    demo_eval_rows = None
    if is_demo:
        from .demo import build_demo_model, build_demo_tokenizer

        tokenizer = build_demo_tokenizer()
        train_ex, eval_ex, demo_eval_rows = demo_data()
        dataset_label = "built-in demo task (add one / copy)"
    else:
        tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path, model_args.trust_remote_code, data_args.chat_template_file)
        train_ex, eval_ex, _ = load_train_eval(data_args, args)
        dataset_label = data_args.dataset_name
    train_pairs, _ = _tokenize(tokenizer, train_ex, data_args, "train data", args)
    eval_pairs, _ = _tokenize(tokenizer, eval_ex, data_args, "eval data", args) if eval_ex else ([], None)
    # the demo's before/after table compares chosen with rejected answers: it needs pairs
    demo_pairs = (_tokenize(tokenizer, eval_ex, data_args, "demo eval pairs")[0] if train_pairs and train_pairs[0].label is not None
                  else eval_pairs) if is_demo else None

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
        saved_kind = "ReFT interventions (reft_interventions.safetensors + reft_config.json)"
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

        demo_before = evaluate_demo(model, tokenizer, demo_eval_rows, demo_pairs)

    interrupt = InterruptCallback()
    trainer = PreferenceTrainer(
        model=model, args=args, train_pairs=train_pairs, eval_pairs=eval_pairs, processing_class=tokenizer,
        reference=reference, callbacks=[MetricsFileCallback(str(out)), CheckpointMarkerCallback(), interrupt],
    )
    if args.process_index == 0:
        (out / RUN_CONFIG_FILE).write_text(json.dumps({
            "model": _jsonable(model_args), "data": _jsonable(data_args), "training": _jsonable(args.to_dict()),
            "base_model": model_args.model_name_or_path or "built-in demo model", "dataset": dataset_label,
            "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "demo": is_demo,
        }, indent=2))
    train_output = trainer.train(resume_from_checkpoint=_resume_arg(args.resume_from_checkpoint, out))
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

        after = evaluate_demo(trainer.model, tokenizer, demo_eval_rows, demo_pairs)
        demo_table = [(k, demo_before[k], after[k]) for k in demo_before]
        final.update({f"demo_{k}": v for k, v in after.items()})
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        plot_training_curves(out)
        write_model_card(out, {
            "method": args.method, "base_model": model_args.model_name_or_path or "built-in demo model (random init)",
            "dataset": dataset_label, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "saved": saved_kind,
            "hyperparameters": _hyperparameters(args, data_args), "final_metrics": final,
        })
        (out / RUN_COMPLETE_FILE).write_text(json.dumps({"final_metrics": final, "seconds": seconds, "demo": is_demo}, indent=2))
    return RunResult(out, final, len(train_pairs), len(eval_pairs), seconds, demo_table)


def _resume_arg(value, out: Path):
    if not value:
        return None
    if str(value) == "latest":
        last = find_latest_checkpoint(out)
        if last is None:
            raise PreftuneError(f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {str(out)!r}")
        logger.info("resuming from %s", last)
        return str(last)
    path = Path(value)
    if not (path.is_dir() and (path / "trainer_state.json").exists()):
        raise PreftuneError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no trainer_state.json)")
    return str(path)
