"""One training run, top to bottom: what ``preftune train`` does.

:func:`run_training` is a pipeline of named stages, each a function with explicit inputs and
outputs::

    setup_run        options            -> RunSetup       output folder, device and precision, seed, checks,
                                                          the checkpoint to resume from (one that verifies, written
                                                          by as many processes: preftune.launch)
    run_inputs       options            -> RunInputs      where tokenizer, examples and starting model come from:
                                                          the built-in demo (preftune.demo.DemoInputs) or
                                                          the user's model and data (UserInputs below)
    prepare_data     inputs, tokenizer  -> TrainingData   tokenized train and held-out pairs (TokenizedPairs,
                                                          from the tokenized cache) and per-source counts
    adopt_default_template                                the tokenizer takes preftune's default ChatML template
                                                          when the data was rendered with it (saved with the model)
    prepare_model    inputs, options    -> PreparedModel  starting model + PEFT or ReFT, and its ModelHooks
    prepare_reference model, data       -> reference      the reference (None for reference-free methods)
    train            everything above   -> trained Trainer (an interrupt ends in RunInterrupted); the folder
                                                          is touched (run_config.json, with the command that
                                                          started the run) only once training begins
    save_outputs     trainer, ...       -> RunResult      model, tokenizer, curves, model card, run_complete.json

The run folder's files are named and written through :mod:`preftune.rundir`; writes that must not
half-succeed (checkpoint markers, the final save, run_complete.json) go through :mod:`preftune.saving`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import DataArguments, ModelArguments, PreftuneConfig, with_absolute_paths
from .data.splits import TrainingData
from .data.tokenize import PromptRendering
from .errors import EveryProcessError, PreftuneError
from .model_hooks import NO_HOOKS, ModelHooks
from .rundir import REFT_CONFIG_FILE, REFT_WEIGHTS_FILE

logger = logging.getLogger("preftune")

__all__ = ["run_training", "RunResult", "RunInterrupted", "RunInputs", "UserInputs"]


class RunInterrupted(EveryProcessError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (every process of the run stops
    after the same step and raises it; the CLI prints it once)."""

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


# --- stage outputs ----------------------------------------------------------------------------------
@dataclass
class RunSetup:
    output_dir: Path
    device: object  # preftune.training_model.DeviceChoice
    started: float  # time.perf_counter() at the start
    resume: str | None  # the checkpoint to resume from, verified against its manifest (None: a fresh run)
    created_output_dir: bool = False  # this run made the folder (so it may remove it again if it stays empty)

    def remove_unused_output_dir(self) -> None:
        """After a failure: the folder this run created, if nothing was written into it."""
        if self.created_output_dir:
            try:
                self.output_dir.rmdir()  # only succeeds when empty
            except OSError:
                pass


@dataclass
class PreparedModel:
    model: object
    hooks: ModelHooks
    saved_kind: str  # how the model card describes what the run saves


class RunInputs(Protocol):
    """Where a run's tokenizer, examples and starting model come from."""

    is_demo: bool
    dataset_label: str  # how the run config and model card name the data
    base_model_label: str  # ... and the starting model

    def load_tokenizer(self): ...

    def load_data(self, tokenizer, data_args: DataArguments, seed: int, unpaired: bool = False, kl_group: int | None = None) -> TrainingData:
        """The run's pairs; ``unpaired``/``kl_group``: labelled examples with KL completions (KTO)."""

    def load_model(self, tokenizer, device, seed: int): ...

    def held_out_check(self, model, tokenizer, eval_pairs, hooks: ModelHooks) -> dict[str, float] | None:
        """Metrics shown before and after training (the demo's table); None for none."""


@dataclass
class UserInputs:
    """The user's model (a folder or hub name) and preference data (``--dataset_name`` or a ``datasets:`` mixture)."""

    model_args: ModelArguments
    data_args: DataArguments
    is_demo: bool = False

    @property
    def dataset_label(self) -> str:
        from .data.splits import describe_sources

        return describe_sources(self.data_args.sources())

    @property
    def base_model_label(self) -> str:
        return self.model_args.model_name_or_path

    def load_tokenizer(self):
        from .training_model import load_tokenizer

        m = self.model_args
        return load_tokenizer(m.tokenizer_name_or_path or m.model_name_or_path, m.trust_remote_code, m.chat_template_file)

    def load_data(self, tokenizer, data_args: DataArguments, seed: int, unpaired: bool = False, kl_group: int | None = None) -> TrainingData:
        from .data.splits import data_from_examples, load_train_eval, tokenize_settings_of
        from .data.splits import prepare_data as tokenized_data

        if not unpaired:
            return tokenized_data(tokenizer, data_args, seed)
        # unpaired (KTO): in memory, in data order (an example's KL completion is its neighbour's)
        train, evals, _ = load_train_eval(data_args, seed, unpaired=True)
        return data_from_examples(tokenizer, train, evals, tokenize_settings_of(data_args), unpaired=True, kl_group=kl_group)

    def load_model(self, tokenizer, device, seed: int):
        from .training_model import load_model

        from .hub import local_path_or_name

        # absolute: what the model records as its origin (adapter_config.json's base model) works from anywhere
        return load_model(local_path_or_name(self.model_args.model_name_or_path), self.model_args, device)

    def held_out_check(self, model, tokenizer, eval_pairs, hooks):
        return None


# --- stages -------------------------------------------------------------------------------------------
def _configure_logging(args: PreftuneConfig):
    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("preftune").setLevel(level)


def setup_run(model_args: ModelArguments, data_args: DataArguments, args: PreftuneConfig) -> RunSetup:
    """Logging, seed, option combinations, the output folder, device and precision; fails before any work."""
    from transformers import set_seed

    from .launch import check_resume_launch, resume_options
    from .quant import check_bitsandbytes
    from .rundir import check_output_dir, resolve_resume
    from .training_model import choose_device

    _configure_logging(args)
    started = time.perf_counter()
    set_seed(args.seed)  # before any random init (demo model, LoRA/ReFT weights): same seed, same run
    if model_args.is_demo and data_args.has_data:
        raise PreftuneError("--dataset_name needs --model_name_or_path (run `preftune train` with neither for the built-in demo)")
    if not model_args.is_demo and not data_args.has_data:
        raise PreftuneError("--model_name_or_path needs --dataset_name (a preference data file or folder)")
    resuming = bool(args.resume_from_checkpoint)
    created = not Path(args.output_dir).expanduser().exists()
    if args.process_index == 0:
        out = check_output_dir(args.output_dir, args.overwrite_output_dir, resuming, model_args.is_demo)
    else:
        out = Path(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, out)  # only a checkpoint that verifies; before anything is written
    if resume:  # ... and that this launch continues: the world size it was written with, unless --allow_world_size_change
        check_resume_launch(resume, args, resume_options(out, args.resume_from_checkpoint))
    device = choose_device(model_args.torch_dtype, model_args.attn_implementation, args.batch_layout)
    from .allocator import active_allocator

    logger.info("preftune: %s, %s; %d process%s; memory: %s; linear layers: %s", device.describe(_quantization_label(model_args)), args.precision_choice.describe(),
                args.world_size, "" if args.world_size == 1 else "es", active_allocator(), _linear_kernel_label(args))
    check_bitsandbytes(model_args, args, args.device.type)  # 4/8-bit and 8-bit optimizers work here, or one clear line
    return RunSetup(out, device, started, resume, created and args.process_index == 0)


def _quantization_label(model_args: ModelArguments) -> str | None:
    if model_args.load_in_4bit:
        return f"4-bit {model_args.bnb_4bit_quant_type}"
    return "8-bit" if model_args.load_in_8bit else None


def run_inputs(model_args: ModelArguments, data_args: DataArguments) -> RunInputs:
    """The built-in demo when no model is named, else the user's model and data."""
    if model_args.is_demo:
        from .demo import DemoInputs

        return DemoInputs()
    return UserInputs(model_args, data_args)


def prepare_data(inputs: RunInputs, tokenizer, data_args: DataArguments, args: PreftuneConfig) -> TrainingData:
    """Read, select and tokenize the pairs (one-line errors naming the split or row); the method's
    declaration says whether they become pairs or labelled examples with KL completions. In a
    multi-process run, process 0 fills the tokenized cache while the others wait, then all read it.
    ``--eval_generate`` takes its prompts from the held-out pairs, so it needs some. Pairs longer
    than ``--max_tokens_per_batch`` are named here, once (:func:`preftune.sampling.budget_check`)."""
    from .methods import Hyperparameters, get_method

    spec = get_method(args.method)
    kl_group = args.per_device_train_batch_size if spec.mismatched_completions(Hyperparameters.from_config(args)) else None
    with args.main_process_first(desc="tokenizing the data"):
        data = inputs.load_data(tokenizer, data_args, args.seed, spec.unpaired, kl_group)
    if args.eval_generate and len(data.eval_pairs) == 0:
        raise PreftuneError("--eval_generate answers held-out prompts, and this run holds none out; pass --eval_fraction or --eval_split")
    if args.max_tokens_per_batch is not None and len(data.train_pairs):
        from .data.store import as_tokenized_pairs
        from .sampling import budget_check

        notice = budget_check(as_tokenized_pairs(data.train_pairs).lengths(), args.max_tokens_per_batch, spec.data_unit)
        if notice and args.should_log:  # once, not once per process
            logger.warning(notice)
    return data


def adopt_default_template(tokenizer, data: TrainingData) -> None:
    """When conversational data was rendered with preftune's default ChatML template (the tokenizer
    has none), that template becomes the tokenizer's: every save of the model (checkpoints, the run
    folder, ``preftune merge``, ``preftune export``) then carries the format it was trained on."""
    from .data.tokenize import DEFAULT_CHAT_TEMPLATE
    from .hf_helpers import has_chat_template

    if data.default_template and not has_chat_template(tokenizer):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        logger.info("the model is saved with preftune's default ChatML template, the format its training data was rendered in")


def prepare_model(inputs: RunInputs, tokenizer, model_args: ModelArguments, args: PreftuneConfig, setup: RunSetup) -> PreparedModel:
    """The starting model with LoRA/DoRA adapters or ReFT interventions as asked, and its hooks."""
    from .training_model import apply_peft

    model = inputs.load_model(tokenizer, setup.device, args.seed)
    if args.gradient_checkpointing:
        args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    saved_kind, hooks = "full model", NO_HOOKS
    if model_args.use_peft:
        model = apply_peft(model, model_args, args.gradient_checkpointing)
        saved_kind = "LoRA adapter (load with peft, or merge with `preftune merge`)"
    if model_args.reft_layers:
        from .reft import attach_reft, reft_hooks

        model = attach_reft(model, model_args)
        saved_kind, hooks = f"ReFT interventions ({REFT_WEIGHTS_FILE} + {REFT_CONFIG_FILE})", reft_hooks(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    return PreparedModel(model, hooks, saved_kind)


def prepare_reference(prepared: PreparedModel, model_args: ModelArguments, args: PreftuneConfig, setup: RunSetup,
                      data: TrainingData, tokenizer):
    """The method's reference (built from the *starting* policy, before a checkpoint is loaded), or None."""
    if not args.needs_reference:
        return None
    from .reference import build_reference

    return build_reference(prepared.model, model_args, args, setup.device, data.train_pairs, data.eval_pairs, tokenizer)


def train(prepared: PreparedModel, tokenizer, data: TrainingData, reference, args: PreftuneConfig, setup: RunSetup,
          run_config: dict):
    """Build the Trainer, write run_config.json, train (resuming if asked); returns the Trainer and its output."""
    from .outputs import MetricsFileCallback, TrainingTimeCallback
    from .reliability import InterruptCallback
    from .rundir import checkpoint_path, find_latest_checkpoint
    from .saving import BeginRunCallback, writes_fail_cleanly
    from .trainer import PreferenceTrainer

    out = setup.output_dir
    interrupt = InterruptCallback()
    # PreferenceTrainer adds the checkpoint marker callback itself; BeginRunCallback touches the folder
    # (run_complete.json of an earlier run removed, run_config.json written) only once training begins
    timer = TrainingTimeCallback()
    callbacks = [BeginRunCallback(out, run_config), MetricsFileCallback(str(out)), timer, interrupt]
    if args.eval_generate:
        from .samples import SampleAnswersCallback

        pairs = data.eval_pairs[: args.eval_generate]
        callbacks.append(SampleAnswersCallback(out, tokenizer, pairs, args.eval_generate_max_new_tokens, prepared.hooks))
    trainer = PreferenceTrainer(
        model=prepared.model, args=args, train_pairs=data.train_pairs, eval_pairs=data.eval_pairs, processing_class=tokenizer,
        reference=reference, hooks=prepared.hooks, callbacks=callbacks,
    )
    # a failed write while saving checkpoint-N removes it and ends in one line naming the checkpoint to resume from
    with writes_fail_cleanly(out, "a checkpoint", partial_checkpoint=lambda: checkpoint_path(out, trainer.state.global_step)):
        train_output = trainer.train(resume_from_checkpoint=setup.resume)
    if interrupt.received is not None:
        import signal

        from .launch import current_launch, resume_options

        latest = find_latest_checkpoint(out)
        where = f"checkpoint saved to {latest}" if latest else "no checkpoint could be saved"
        # the same launch again: a resume with another number of processes would not continue this run
        command = current_launch(args.world_size).resume_command(resume_options(out if "command" in run_config else None))
        raise RunInterrupted(
            f"interrupted by {signal.Signals(interrupt.received).name} at step {trainer.state.global_step}; {where}. Resume with: {command}",
            interrupt.received,
        )
    if timer.total is not None and timer.earlier > 0:  # a resumed run: train_runtime is this segment's time
        train_output.metrics["total_train_runtime"] = round(timer.total, 4)
    return trainer, train_output


def final_metrics(trainer, train_output, has_eval: bool) -> dict:
    """The Trainer's summary (``total_train_runtime``: a resumed run's training time over all its
    segments), the last logged value of the headline metrics (the last step is always logged:
    :class:`preftune.outputs.MetricsFileCallback`), and a final evaluation."""
    final = dict(train_output.metrics)
    last = {}
    for rec in trainer.state.log_history:
        last.update({k: v for k, v in rec.items() if isinstance(v, (int, float))})
    for k in ("loss", "nll_loss", "rewards/margins", "rewards/accuracies", "log_odds_chosen", "tokens_per_second"):
        if k in last:
            final[k] = last[k]
    if has_eval:
        final.update(trainer.evaluate())
    return final


def save_outputs(trainer, tokenizer, inputs: RunInputs, prepared: PreparedModel, data: TrainingData, final: dict,
                 model_args: ModelArguments, data_args: DataArguments, args: PreftuneConfig, setup: RunSetup) -> float:
    """Model and tokenizer, curves, model card and, last, run_complete.json with the manifest of what a
    reader needs (main process only); returns the run's seconds. The model is staged and moved into
    place; a failed write leaves no file of the attempt and no run_complete.json, in one line."""
    from .outputs import plot_training_curves, write_model_card
    from .saving import finish_run, staged_final_model, writes_fail_cleanly

    out = setup.output_dir
    seconds = time.perf_counter() - setup.started
    if not trainer.is_world_process_zero():
        return seconds
    with writes_fail_cleanly(out, "the final model"), staged_final_model(out) as staged:
        trainer.save_model(str(staged.folder))
        tokenizer.save_pretrained(str(staged.folder))
    with writes_fail_cleanly(out, "the run's records"):
        plot_training_curves(out)
        write_model_card(out, {
            "method": args.method, "base_model": inputs.base_model_label, "dataset": inputs.dataset_label,
            "train_pairs": len(data.train_pairs), "eval_pairs": len(data.eval_pairs), "saved": prepared.saved_kind,
            "data_sources": data.sources, "hyperparameters": _hyperparameters(args, data_args), "final_metrics": final,
        })
        finish_run(out, {"final_metrics": final, "seconds": seconds, "demo": inputs.is_demo}, staged.files)
    return seconds


def run_training(model_args: ModelArguments, data_args: DataArguments, args: PreftuneConfig, command: dict | None = None) -> RunResult:
    """Run one training job (see the module docstring for the stages); returns where it saved and its final metrics.

    ``command``: what ``preftune train`` was given (:class:`preftune.commands.train.TrainCommand`),
    recorded in run_config.json so that the run can be resumed from its folder alone. A run that
    fails removes the output folder it created if nothing was written into it."""
    setup = setup_run(model_args, data_args, args)
    try:
        return _run_stages(model_args, data_args, args, setup, command)
    except BaseException:
        setup.remove_unused_output_dir()
        raise


def _run_stages(model_args: ModelArguments, data_args: DataArguments, args: PreftuneConfig, setup: RunSetup, command: dict | None) -> RunResult:
    """:func:`run_training` after its setup: the stages in order."""
    from .allocator import active_allocator

    inputs = run_inputs(model_args, data_args)
    tokenizer = inputs.load_tokenizer()
    data = prepare_data(inputs, tokenizer, data_args, args)
    adopt_default_template(tokenizer, data)
    prepared = prepare_model(inputs, tokenizer, model_args, args, setup)
    reference = prepare_reference(prepared, model_args, args, setup, data, tokenizer)
    before = inputs.held_out_check(prepared.model, tokenizer, data.eval_pairs, prepared.hooks)

    run_config = {
        # local paths absolute, so eval, chat, merge, report and a resume find them from anywhere
        "model": with_absolute_paths(_jsonable(model_args)), "data": with_absolute_paths(_jsonable(data_args)),
        "training": with_absolute_paths(_jsonable(args.to_dict())),
        "base_model": inputs.base_model_label, "dataset": inputs.dataset_label,
        "train_pairs": len(data.train_pairs), "eval_pairs": len(data.eval_pairs), "demo": inputs.is_demo,
        "data_sources": data.sources,
        # plain text or a chat template: what `preftune chat --format auto` follows
        PromptRendering.RECORD_KEY: data.rendering.to_record(),
        # processes that trained together (DDP); a launcher that started fewer than asked shows here
        "world_size": args.world_size,
        # what --bf16/--fp16 resolved to on this machine, and why (training.bf16 holds the resolved bool)
        "precision": args.precision_choice.describe(),
        "allocator": active_allocator(),
        "linear_kernel": _linear_kernel_label(args),
    }
    if command is not None:
        run_config["command"] = command
    trainer, train_output = train(prepared, tokenizer, data, reference, args, setup, run_config)
    final = final_metrics(trainer, train_output, len(data.eval_pairs) > 0)

    table = None
    if before is not None:
        after = inputs.held_out_check(trainer.model, tokenizer, data.eval_pairs, trainer.hooks)
        table = [(k, before[k], after[k]) for k in before]
        final.update({f"demo_{k}": v for k, v in after.items()})
    seconds = save_outputs(trainer, tokenizer, inputs, prepared, data, final, model_args, data_args, args, setup)
    return RunResult(setup.output_dir, final, len(data.train_pairs), len(data.eval_pairs), seconds, table)


# --- what the run config and model card record ------------------------------------------------------
def _linear_kernel_label(args: PreftuneConfig) -> str:
    """What ``--linear_kernel`` resolved to on this device, for the start-up line and run_config.json."""
    from .linear_kernel import linear_kernel_of

    kernel = linear_kernel_of(args)
    if kernel == "onednn":
        return "oneDNN matmul (float32, CPU)"
    if kernel == "cast_once":
        return "F.linear under autocast, frozen weights cast once"
    return "F.linear" + (" under autocast" if args.bf16 or args.fp16 else "")


def _hyperparameters(args: PreftuneConfig, data_args: DataArguments) -> dict:
    """The model card's hyper-parameters: the method's own (its declaration lists them) and the run's."""
    from .methods import get_method

    keys = ["method", *get_method(args.method).hyperparameters, "learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs",
            "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "optim", "seed", "batch_layout",
            "nll_on_prompt"]
    out = {k: getattr(args, k) for k in keys}
    out.update({k: " ".join(map(str, v)) for k, v in out.items() if isinstance(v, list)})  # loss_type, loss_weights
    out["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    out["optim"] = str(getattr(args.optim, "value", args.optim))
    out.update(max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length)
    out["precision"] = args.precision_choice.describe()  # --bf16 auto differs between machines: say what ran
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
