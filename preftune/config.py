"""Typed configuration: model, data and training (a ``transformers.TrainingArguments`` subclass).

Every field has a help string (shown by ``preftune train --help``, grouped by ``group``) and is
validated in ``__post_init__`` with a message that says how to fix it. YAML run files are only a
serialization of these fields (see ``examples/``).
"""

from __future__ import annotations


import inspect
import os
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .errors import PreftuneError
from .hf_helpers import TORCH_DTYPES
from .linear_kernel import LINEAR_KERNEL_CHOICES
from .losses import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, KTO_LOSS_TYPES

__all__ = [
    "LoadArguments", "ModelArguments", "DataSourceArguments", "TokenizeArguments", "DataArguments", "PreftuneConfig", "ORPOConfig",
    "GenerationArguments", "ChatArguments", "EvalArguments", "MergeArguments", "ConvertArguments", "ExportArguments", "ReportArguments", "VerifyArguments", "field_groups",
    "TRAIN_OPTIONS", "GROUP_TITLES", "ALTERNATIVE_OPTIONS", "REFERENCE_OPTIONS", "PATH_OPTIONS", "NAME_OR_PATH_OPTIONS", "MIXTURE_OPTIONS",
    "with_absolute_paths",
]

# Options of which a run takes one: a flag replaces the YAML file's alternatives to it
# (commands.options.command_line_wins); two of them on the command line (or in one file) are refused.
ALTERNATIVE_OPTIONS = (("dataset_name", "datasets"), ("eval_split", "eval_fraction", "eval_datasets"))

# Options that only a method with a reference model (MethodSpec.needs_reference) reads.
REFERENCE_OPTIONS = ("ref_model_name_or_path", "precompute_ref_log_probs", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")


# Help group of every field, per options class, filled by @_grouped (argparse rejects unknown
# metadata keys, so the group cannot live in the field's metadata).
FIELD_GROUPS: dict[type, dict[str, str]] = {}
_pending_groups: list[str] = []


def _f(default, help: str, group: str, **argparse_kwargs):
    _pending_groups.append(group)
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def _grouped(cls):
    """Pair the fields declared in ``cls``'s body, in order, with the groups given to ``_f``."""
    names = list(inspect.get_annotations(cls))
    if len(names) != len(_pending_groups):
        raise RuntimeError(f"{cls.__name__}: every field must be declared with _f()")
    FIELD_GROUPS[cls] = dict(zip(names, _pending_groups))
    _pending_groups.clear()
    return cls


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _method_help() -> str:
    return "; ".join(f"{name}: {spec.summary}" for name, spec in _methods().items()) + "."


def _methods():
    from .methods import METHODS

    return METHODS


def _require(cond: bool, msg: str):
    if not cond:
        raise PreftuneError(msg)


@_grouped
@dataclass
class LoadArguments:
    """How to load a model: shared by training and every command that loads one (chat, eval, merge)."""

    torch_dtype: str = _f("auto", "Weights dtype: auto (bf16 where the hardware supports it, else fp32), float32, bfloat16, float16.", "model")
    trust_remote_code: bool = _f(False, "Allow model code from the model's folder (only for models you trust).", "model")
    chat_template_file: str | None = _f(None, "Jinja chat template file to use instead of the tokenizer's.", "model")

    def __post_init__(self):
        from pathlib import Path

        _require(not self.chat_template_file or Path(self.chat_template_file).expanduser().is_file(),
                 f"--chat_template_file {self.chat_template_file!r} not found")
        _require(self.torch_dtype in TORCH_DTYPES, f"--torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {self.torch_dtype!r}")


@_grouped
@dataclass
class ModelArguments(LoadArguments):
    model_name_or_path: str | None = _f(
        None, "Model to align: a local folder or a hub name. Omit it (and --dataset_name) to run the built-in demo.", "model"
    )
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer to use, if not the model's own.", "model")
    attn_implementation: str = _f("auto", "Attention kernel: auto (flash_attention_2 on GPUs with flash_attn, else sdpa), sdpa, eager; the packed layout runs it per segment (no T x T mask).", "model")
    # PEFT
    use_peft: bool = _f(False, "Train LoRA adapters instead of all weights (saves only the adapter).", "peft")
    lora_r: int = _f(16, "LoRA rank r.", "peft")
    lora_alpha: int = _f(32, "LoRA scaling alpha (effective scale alpha/r, or alpha/sqrt(r) with --use_rslora).", "peft")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.", "peft")
    lora_target_modules: str = _f("all-linear", "Comma-separated module names to adapt, or all-linear (every projection but the LM head).", "peft")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).", "peft")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).", "peft")
    load_in_4bit: bool = _f(False, "QLoRA: load the base model in 4-bit through bitsandbytes (implies --use_peft).", "peft")
    load_in_8bit: bool = _f(False, "Load the base model in 8-bit through bitsandbytes (implies --use_peft).", "peft")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit quantization type: nf4 or fp4.", "peft")
    use_bnb_nested_quant: bool = _f(True, "Double quantization of the 4-bit quantization constants.", "peft")
    # ReFT
    reft_layers: str | None = _f(None, "ReFT: comma-separated decoder layer indices to intervene on, e.g. 18,28 (enables ReFT).", "reft")
    reft_rank: int = _f(4, "ReFT: rank of each LoReFT intervention.", "reft")
    reft_positions: str = _f("f1+l1", "ReFT: prompt positions, pyreft syntax: fK (first K), lK (last K), joined by +.", "reft")
    reft_share_weights: bool = _f(True, "ReFT: share one intervention between the first and last positions of a layer.", "reft")

    def __post_init__(self):
        super().__post_init__()
        _require(self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"), f"--attn_implementation {self.attn_implementation!r} is not one of auto, sdpa, eager, flash_attention_2, flex_attention")
        _require(self.lora_r > 0, f"--lora_r must be positive, got {self.lora_r}")
        _require(0.0 <= self.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _require(not (self.load_in_4bit and self.load_in_8bit), "choose one of --load_in_4bit and --load_in_8bit")
        _require(self.bnb_4bit_quant_type in ("nf4", "fp4"), f"--bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        _require(self.reft_rank > 0, f"--reft_rank must be positive, got {self.reft_rank}")
        if self.load_in_4bit or self.load_in_8bit:
            self.use_peft = True
        _require(not (self.use_peft and self.reft_layers), "ReFT and LoRA are separate methods here: pass --reft_layers or --use_peft, not both")
        if self.reft_layers:  # fail before loading the model
            from .reft.spec import parse_layers, parse_positions

            parse_layers(self.reft_layers), parse_positions(self.reft_positions)

    @property
    def is_demo(self) -> bool:
        return self.model_name_or_path is None


def _check_mixture(args, what: str, validate) -> None:
    """Read ``args.<what>`` (``datasets``/``eval_datasets``) into its list of entries and check
    them with ``validate()`` now, before any model loads; an error about entries read from a file
    (``--datasets mix.yaml``) names that file."""
    from .data.splits import read_entries

    value = getattr(args, what)
    setattr(args, what, read_entries(value, what))
    try:
        validate()
    except PreftuneError as e:
        if not isinstance(value, str) or str(e).startswith(f"--{what} "):
            raise
        raise PreftuneError(f"--{what} {value!r}: {e}") from None


@_grouped
@dataclass
class DataSourceArguments:
    """Which preference data to read and how its rows map to prompt/chosen/rejected (train, eval)."""

    dataset_name: list[str] | None = _f(None, "Preference data: a .jsonl/.json/.csv/.tsv/.parquet file, a save_to_disk folder, or a hub name; several values mix all their rows (per-source weights: datasets:).", "data")
    datasets: str | None = _f(None, "A mixture: in the YAML run file a datasets: list of entries (path, split, format, *_column, weight | num_samples | fraction, label); on the command line a YAML/JSON file holding that list. See docs/data.md.", "data")
    dataset_split: str = _f("train", "Split to train on (for folders, DatasetDicts and hub datasets).", "data")
    dataset_format: str = _f("auto", "auto (prompt/chosen/rejected, messages, implicit prompt) or truthfulqa (Question, Best Answer, Incorrect Answers).", "data")
    prompt_column: str = _f("prompt", "Column with the prompt (string or messages). Absent: the prompt is the shared prefix of chosen and rejected.", "data")
    chosen_column: str = _f("chosen", "Column with the preferred answer.", "data")
    rejected_column: str = _f("rejected", "Column with the dispreferred answer.", "data")
    system_column: str = _f("system", "Column with an optional system prompt.", "data")
    tools_column: str = _f("tools", "Column with optional tool (function) JSON schemas, passed to the chat template.", "data")
    completion_column: str = _f("completion", "Unpaired data (--method kto): column with the completion.", "data")
    label_column: str = _f("label", "Unpaired data (--method kto): column with the label, true (desirable) or false (undesirable).", "data")
    on_bad_row: str = _f("error", "error: stop at the first bad row, naming file, line and field; skip: skip bad rows and report counts by reason.", "data")

    def __post_init__(self):
        from .data import BAD_ROW_POLICIES, DATASET_FORMATS

        _require(self.on_bad_row in BAD_ROW_POLICIES, f"--on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {self.on_bad_row!r}")
        _require(self.dataset_format in DATASET_FORMATS, f"--dataset_format must be one of {', '.join(DATASET_FORMATS)}, got {self.dataset_format!r}")
        if isinstance(self.dataset_name, str):  # a YAML file or an old run_config.json gives one string
            self.dataset_name = [self.dataset_name]
        _require(not (self.dataset_name and self.datasets), "pass either --dataset_name or datasets: (a mixture), not both")
        _check_mixture(self, "datasets", self.sources)

    def sources(self):
        """The sources to read, as :class:`preftune.data.mixture.DatasetSpec` s."""
        from .data.splits import training_sources

        return training_sources(self)

    @property
    def has_data(self) -> bool:
        return bool(self.dataset_name or self.datasets)


@_grouped
@dataclass
class TokenizeArguments:
    """How rows become tokens: length limits, truncation and the chat template (train, eval)."""

    max_length: int | None = _f(1024, "Maximum tokens of prompt + completion.", "data")
    max_prompt_length: int | None = _f(512, "Maximum prompt tokens (cut by --truncation_mode).", "data")
    truncation_mode: str = _f("keep_end", "How to cut long prompts: keep_end (keep the last tokens) or keep_start.", "data")
    chat_template: str = _f("auto", "auto: template conversational data (and string data with a system column); always; never.", "data")

    def __post_init__(self):
        _require(self.truncation_mode in ("keep_end", "keep_start"), f"--truncation_mode must be keep_end or keep_start, got {self.truncation_mode!r}")
        _require(self.chat_template in ("auto", "always", "never"), f"--chat_template must be auto, always or never, got {self.chat_template!r}")
        _require(self.max_length is None or self.max_length >= 2, f"--max_length must be at least 2, got {self.max_length}")
        _require(self.max_prompt_length is None or self.max_prompt_length >= 1, f"--max_prompt_length must be at least 1, got {self.max_prompt_length}")


@_grouped
@dataclass
class DataArguments(DataSourceArguments, TokenizeArguments):
    """Everything a training run needs about its data: source, tokenization, the held-out split
    and the tokenized cache."""

    eval_split: str | None = _f(None, "Split (of every training source) or file path to evaluate on.", "data")
    eval_fraction: float | None = _f(None, "Hold out this fraction of the training data for evaluation instead of --eval_split.", "data")
    eval_datasets: str | None = _f(None, "The eval split as its own mixture (same entries as datasets:).", "data")
    max_train_samples: int | None = _f(None, "Use only the first N training pairs (quick experiments; a mixture is shuffled first).", "data")
    dataset_num_proc: int | None = _f(None, "Processes that tokenize (default: all CPU cores, up to 8, for sources of 20,000+ rows, else 1).", "data")
    dataset_cache_dir: str | None = _f(None, "Folder of the tokenized-data cache (default $PREFTUNE_CACHE_DIR or ~/.cache/preftune/tokenized; safe to delete).", "data")

    def __post_init__(self):
        DataSourceArguments.__post_init__(self)
        TokenizeArguments.__post_init__(self)
        _require(not (self.eval_split and self.eval_fraction), "pass either --eval_split or --eval_fraction, not both")
        _require(not (self.eval_datasets and (self.eval_split or self.eval_fraction)), "pass one of eval_datasets, --eval_split and --eval_fraction")
        if self.eval_fraction is not None:
            _require(0.0 < self.eval_fraction < 1.0, f"--eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        _require(self.dataset_num_proc is None or self.dataset_num_proc >= 1, f"--dataset_num_proc must be at least 1, got {self.dataset_num_proc}")
        _require(self.max_train_samples is None or self.max_train_samples >= 1, f"--max_train_samples must be at least 1, got {self.max_train_samples}")
        _check_mixture(self, "eval_datasets", self.eval_sources)

    def eval_sources(self):
        """The sources of a separate eval split (eval_datasets:, or --eval_split of every source), or None."""
        from .data.splits import eval_sources

        return eval_sources(self)


@_grouped
@dataclass
class PreftuneConfig(TrainingArguments):
    """``TrainingArguments`` plus the preference-method settings. ``ORPOConfig`` is the same class."""

    method: str = _f("orpo", "Alignment method: " + _method_help(), "method")
    beta: float = _f(0.1, "ORPO: weight of the odds-ratio term (the paper's lambda, the authors' alpha). DPO/SimPO/CPO/KTO: inverse temperature beta (IPO's tau).", "method")
    loss_type: list[str] | None = _f(
        None,
        "Loss variant(s), TRL's names. dpo: " + ", ".join(DPO_LOSS_TYPES) + " (default sigmoid); several at once are summed "
        "with --loss_weights, e.g. --loss_type sigmoid sft --loss_weights 1.0 0.5 (RPO) or a YAML list. kto: " + ", ".join(KTO_LOSS_TYPES) + " (default kto).",
        "method",
    )
    loss_weights: list[float] | None = _f(None, "DPO: one weight per --loss_type (default 1.0 each).", "method")
    label_smoothing: float = _f(0.0, "DPO: label-noise rate eps in [0, 0.5): robust, exo_pair (needs > 0), aot, aot_unpaired, and conservative DPO for sigmoid.", "method")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma.", "method")
    cpo_alpha: float = _f(1.0, "CPO: weight of the NLL term.", "method")
    ld_alpha: float | None = _f(None, "DPO (LD-DPO): weight alpha in [0, 1] of completion tokens beyond the shorter completion of each pair (1: plain DPO, 0: shared length only).", "method")
    f_divergence_type: str = _f("reverse_kl", "DPO (f-DPO): " + ", ".join(F_DIVERGENCES) + "; a non-default one needs loss types built on the reward difference: "
                                + ", ".join(F_DIVERGENCE_LOSS_TYPES) + ".", "method")
    f_alpha_divergence_coef: float = _f(0.5, "DPO: alpha of --f_divergence_type alpha_divergence.", "method")
    discopop_tau: float = _f(0.05, "DPO: temperature tau of --loss_type discopop.", "method")
    use_weighting: bool = _f(False, "DPO (WPO): weight each pair by its length-normalised policy probabilities.", "method")
    bco_running_mean: bool = _f(False, "DPO bco_pair: shift rewards by their running mean over optimizer steps (the BCO paper's delta; TRL 1.16 uses none). Saved in checkpoints.", "method")
    desirable_weight: float = _f(1.0, "KTO: weight of the desirable examples' losses (lambda_D).", "method")
    undesirable_weight: float = _f(1.0, "KTO: weight of the undesirable examples' losses (lambda_U).", "method")
    nll_on_prompt: bool = _f(False, "Include prompt tokens in the NLL (TRL's ORPO behaviour); the paper uses completion tokens only.", "method")
    router_aux_loss_coef: float | None = _f(None, "MoE: weight of the router load-balancing loss (default: the model config's, when it sets output_router_logits).", "method")
    ref_model_name_or_path: str | None = _f(None, "DPO/KTO: reference model (default: the starting policy; for PEFT runs, the base model with adapters disabled).", "method")
    precompute_ref_log_probs: bool = _f(False, "DPO/KTO: compute reference log-probs once before training, cached on disk under output_dir.", "method")
    sync_ref_model: bool = _f(False, "DPO/KTO (TR-DPO): every --ref_model_sync_steps steps set the reference to alpha * policy + (1 - alpha) * reference. Needs a separate reference model (not PEFT adapters-off, not precomputed).", "method")
    ref_model_mixup_alpha: float = _f(0.6, "TR-DPO: alpha in [0, 1] of --sync_ref_model.", "method")
    ref_model_sync_steps: int = _f(512, "TR-DPO: optimizer steps between reference updates (the paper's tau).", "method")
    batch_layout: str = _f("packed", "packed: prefix-shared, padding-free (default); padded: TRL-style reference layout.", "engine")
    row_budget: int | None = _f(None, "packed layout: tokens per packed row (default: chosen per batch by a cost model of padding vs attention).", "engine")
    max_tokens_per_batch: int | None = _f(None, "Form batches by token count instead of pair count (steady memory peak).", "engine")
    logprob_chunk_size: int = _f(0, "Tokens per chunk when computing log-probs through the LM head (memory O(chunk x vocab)); 0: about 128 MB of float32 logits per chunk (256 to 1024 tokens).", "engine")
    logprob_cache_mb: float = _f(256.0, "Keep the LM head's softmax from the forward (skipping one matmul in the backward) when it fits in this many MiB; 0 always recomputes. Only a trainable head uses it (a frozen head keeps no softmax).", "engine")
    max_nonfinite_steps: int = _f(5, "Skip steps whose loss or gradient is not finite; stop with an error after this many.", "engine")
    memory_preflight: bool = _f(True, "Before the first step, run forward+backward on the largest batch so out-of-memory fails in the first minute with a fix.", "engine")
    selective_checkpointing: str = _f("mlp", "What each decoder layer keeps for the backward. mlp (default): the feed-forward block keeps its "
                                      "projections' outputs and recomputes its activation and gated product (same numbers, about a third "
                                      "less activation memory, under 1 percent more step time measured); true: every decoder layer keeps only its matmul "
                                      "and attention outputs and recomputes norms, rotary and the rest too (less memory again, 10-20% slower); "
                                      "false: keep everything autograd saves. --gradient_checkpointing true (replay whole layers) replaces it.", "engine")
    linear_kernel: str = _f("auto", "How linear layers run on a CPU. auto (default): float32 layers through oneDNN's matmul where this "
                            "PyTorch has it (measured here 20-40 percent faster than the BLAS behind F.linear at a 0.5B model's shapes; "
                            "same float32 arithmetic, last bits differ); under bf16/fp16 mixed precision, F.linear with each frozen "
                            "weight cast to bf16/fp16 once and kept, instead of at every call (the same bits; about 6 percent of a "
                            "LoRA step measured), or stored in bf16 during training when bf16 holds it exactly (a bf16 checkpoint; "
                            "half its memory); the plain F.linear on GPUs. onednn: require oneDNN in float32; default: F.linear "
                            "everywhere (bit-identical to transformers' own forward).", "engine")
    reuse_freed_memory: bool = _f(True, "Keep memory freed at the end of a step for the next one (Linux/glibc malloc tuning) instead of page-faulting GBs of fresh pages in every step; the peak is unchanged, RSS stays near it between steps.", "engine")
    overwrite_output_dir: bool = _f(False, "Allow writing into an output_dir that already holds a finished run.", "engine")
    allow_world_size_change: bool = _f(False, "Resume a checkpoint with another number of processes than it was written with. Off: "
                                       "such a resume is refused, since the global batch (per_device_train_batch_size x "
                                       "gradient_accumulation_steps x world size) and the data position would change; on: the run "
                                       "continues and logs the global batch before and after.", "engine")
    eval_generate: int = _f(0, "Greedy answers to this many fixed held-out prompts before training, at each evaluation and at the end, "
                            "written to samples.jsonl and shown by `preftune report` (0: off; needs held-out pairs).", "training")
    eval_generate_max_new_tokens: int = _f(64, "Longest --eval_generate answer, in tokens.", "training")
    # TrainingArguments defaults better suited to preference tuning
    learning_rate: float = _f(8e-6, "Peak learning rate (ORPO paper: 8e-6 for 7B full fine-tunes; use ~1e-4 to 5e-4 for LoRA).", "training")
    logging_steps: float = _f(10, "Log metrics every N steps.", "training")
    report_to: str | None = _f("none", "Integrations to report to: none, tensorboard, wandb, ...", "training")
    remove_unused_columns: bool = _f(False, "Kept False: preftune's batches are built by its own collator.", "training")
    dataloader_pin_memory: bool = _f(False, "Pin host memory for GPU transfers.", "training")
    warmup_ratio: float | None = _f(None, "Warm-up as a fraction of total steps (transformers 5 folds this into --warmup_steps; kept for familiar configs).", "training")
    disable_dropout: bool = _f(True, "Turn dropout off in the model (as TRL does for preference methods).", "method")
    bf16: str = _f(
        "auto",
        "bf16 mixed precision: auto (default: on where the device runs bf16 fast, CUDA GPUs with bf16 and CPUs with "
        "AVX512-BF16 or AMX; fp32 elsewhere, so a run's numbers depend on the machine), true, or false (fp32 compute on "
        "every machine). Weights, optimizer state, log-softmax and loss stay fp32. An explicit --fp16 true wins over auto. "
        "No --use_cpu needed on a CPU.",
        "training", nargs="?", const="true",
    )

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "preftune-output"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Multi-process on CPU (torchrun, examples/cpu_2proc.sh): transformers only sets up
            # gloo DDP when use_cpu is set; without it every process trains alone.
            self.use_cpu = True
        if self.warmup_ratio is not None:
            _require(0.0 <= self.warmup_ratio < 1.0, f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        self._check_training_numbers()
        self._resolve_precision()
        super().__post_init__()
        _require(self.beta > 0, f"--beta must be positive, got {self.beta}")
        self._check_method()
        _require(self.batch_layout in ("packed", "padded"), f"--batch_layout must be packed or padded, got {self.batch_layout!r}")
        self.selective_checkpointing = _one_of("--selective_checkpointing", self.selective_checkpointing, SELECTIVE_CHECKPOINTING_CHOICES)
        self.linear_kernel = _one_of("--linear_kernel", self.linear_kernel, LINEAR_KERNEL_CHOICES)
        _require(self.logprob_chunk_size >= 0, f"--logprob_chunk_size must be 0 (auto) or a number of tokens, got {self.logprob_chunk_size}")
        _require(self.logprob_cache_mb >= 0, f"--logprob_cache_mb must be >= 0, got {self.logprob_cache_mb}")
        _require(self.max_tokens_per_batch is None or self.max_tokens_per_batch > 0, "--max_tokens_per_batch must be positive")
        _require(self.max_nonfinite_steps >= 0, "--max_nonfinite_steps must be >= 0")
        _require(self.eval_generate >= 0, f"--eval_generate must be >= 0 (0 turns it off), got {self.eval_generate}")
        _require(self.eval_generate_max_new_tokens >= 1, f"--eval_generate_max_new_tokens must be at least 1, got {self.eval_generate_max_new_tokens}")

    def _check_training_numbers(self) -> None:
        """The Trainer options that torch or transformers would otherwise reject mid-setup, with a
        traceback, or accept and then train nothing."""
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, flag)
            _require(value >= 1, f"--{flag} must be at least 1, got {value}")
        _require(self.learning_rate >= 0, f"--learning_rate must be >= 0, got {self.learning_rate}")
        _require(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm is None or self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")
        _require(self.num_train_epochs >= 0, f"--num_train_epochs must be >= 0, got {self.num_train_epochs}")
        _require(self.max_steps > 0 or self.num_train_epochs > 0,
                 f"nothing to train: --num_train_epochs {self.num_train_epochs:g} and --max_steps {self.max_steps}; "
                 "pass --num_train_epochs N or --max_steps N")

    def _check_method(self) -> None:
        """Resolve ``loss_type`` and check every method setting against the method's declaration."""
        from .methods import Hyperparameters, get_method

        spec = get_method(self.method)
        if isinstance(self.loss_type, str):  # a YAML scalar or a Python string
            self.loss_type = [self.loss_type]
        if isinstance(self.loss_weights, (int, float)):
            self.loss_weights = [self.loss_weights]
        if self.loss_type is None:
            self.loss_type = list(spec.loss_types[:1])
        _require(bool(spec.loss_types) or not self.loss_type, f"--loss_type chooses a variant of dpo or kto; --method {spec.name} has none (drop --loss_type)")
        for name in self.loss_type:
            _require(name in spec.loss_types, f"--loss_type must be one of {', '.join(spec.loss_types)} for --method {spec.name}, got {name!r}")
        _require(self.loss_type or not spec.loss_types, f"--loss_type needs at least one of {', '.join(spec.loss_types)}")
        if self.loss_weights is not None:
            _require(all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.loss_weights), f"--loss_weights must be numbers, got {self.loss_weights}")
            self.loss_weights = [float(w) for w in self.loss_weights]
        self.check_options_apply()
        _require(0.0 <= self.label_smoothing < 0.5, f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.ld_alpha is None or 0.0 <= self.ld_alpha <= 1.0, f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        _require(self.f_divergence_type in F_DIVERGENCES, f"--f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {self.f_divergence_type!r}")
        _require(self.discopop_tau > 0, f"--discopop_tau must be positive, got {self.discopop_tau}")
        _require(self.desirable_weight >= 0 and self.undesirable_weight >= 0, "--desirable_weight and --undesirable_weight must be >= 0")
        _require(0.0 <= self.ref_model_mixup_alpha <= 1.0, f"--ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
        _require(self.ref_model_sync_steps >= 1, f"--ref_model_sync_steps must be at least 1, got {self.ref_model_sync_steps}")
        if self.sync_ref_model:
            _require(not self.precompute_ref_log_probs, "--sync_ref_model updates the reference during training, so its log-probs cannot be "
                     "precomputed: drop --precompute_ref_log_probs or --sync_ref_model")
        if spec.validate is not None:
            spec.validate(self)
        if spec.mismatched_completions(Hyperparameters.from_config(self)):
            # each example's KL completion comes from its batch neighbours in data order (TRL's rule)
            _require(self.train_sampling_strategy in ("random", "sequential"), f"--method {spec.name} takes batches in data order (its KL completions "
                     f"come from each batch's neighbours); --train_sampling_strategy {self.train_sampling_strategy} would break that pairing")
            self.train_sampling_strategy = "sequential"

    def check_options_apply(self, given: set[str] | None = None) -> None:
        """Refuse an option that does nothing for ``--method``: another method's hyper-parameter
        (by the methods' declared ``hyperparameters``) or a reference option
        (:data:`REFERENCE_OPTIONS`) with a method that has no reference (``needs_reference``).

        ``given``: the options the user set (flags and YAML keys: the command line knows them);
        None: the options whose value differs from the default (a config built in Python).
        ``beta`` is exempt (every method but sft reads it, and the demo sets it for all of them),
        and ``loss_type`` is checked against the method's loss types in ``_check_method``."""
        from .methods import Hyperparameters, get_method

        spec = get_method(self.method)
        if given is None:
            defaults = {f.name: f.default for f in fields(PreftuneConfig)}
            given = {name for name in (*(f.name for f in fields(Hyperparameters)), *REFERENCE_OPTIONS) if getattr(self, name) != defaults[name]}
        for name in (f.name for f in fields(Hyperparameters)):
            if name in given and name not in ("beta", "loss_type") and name not in spec.hyperparameters:
                users = ", ".join(m for m, s in _methods().items() if name in s.hyperparameters)
                raise PreftuneError(f"--{name} does not apply to --method {spec.name} (it is a setting of {users}); drop it")
        if not spec.needs_reference:
            for name in REFERENCE_OPTIONS:
                if name in given:
                    users = ", ".join(m for m, s in _methods().items() if s.needs_reference)
                    raise PreftuneError(f"--{name} is a reference-model option and --method {spec.name} has no reference model: it applies to "
                                        f"--method {users} only; drop it (or choose one of those methods)")

    def _resolve_precision(self):
        """``--bf16 true|false|auto`` and ``--fp16`` -> the bools TrainingArguments takes (what will
        run), and the reason, kept in ``precision_choice`` for the start-up line. On a machine
        without an accelerator, bf16 runs on the CPU: set ``use_cpu`` (transformers refuses bf16 on
        CPU without it)."""
        from .precision import resolve_precision

        accelerator = _has_accelerator() and not self.use_cpu
        try:
            self.precision_choice = resolve_precision(self.bf16, self.fp16, "cuda" if accelerator else "cpu")
        except ValueError as e:
            raise PreftuneError(str(e)) from None
        self.bf16, self.fp16 = self.precision_choice.bf16, self.precision_choice.fp16
        if self.bf16 and not _has_accelerator():
            self.use_cpu = True

    @property
    def needs_reference(self) -> bool:
        from .methods import get_method

        return get_method(self.method).needs_reference


ORPOConfig = PreftuneConfig

SELECTIVE_CHECKPOINTING_CHOICES = ("false", "mlp", "true")


def _one_of(flag: str, value, choices: tuple[str, ...]) -> str:
    """``value`` of option ``flag`` as one of ``choices``, in any case (a YAML/Python bool prints
    as "True"/"False", so ``--selective_checkpointing`` takes booleans too); anything else stops
    with the choices."""
    text = str(value).strip().lower()
    _require(text in choices, f"{flag} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    return text

# --- options of the after-training commands ------------------------------------------------------
@_grouped
@dataclass
class GenerationArguments:
    """How answers are generated (``preftune chat``; ``preftune eval --generate``)."""

    max_new_tokens: int = _f(256, "Longest answer in tokens.", "generation")
    do_sample: bool = _f(False, "Sample instead of greedy decoding (implied by --temperature or --top_p).", "generation")
    temperature: float | None = _f(None, "Sampling temperature (implies --do_sample; 0 means greedy).", "generation")
    top_p: float | None = _f(None, "Nucleus sampling threshold (implies --do_sample).", "generation")
    seed: int | None = _f(None, "Random seed for sampling.", "generation")

    def __post_init__(self):
        _require(self.max_new_tokens >= 1, f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        _require(self.temperature is None or self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        _require(self.top_p is None or 0.0 < self.top_p <= 1.0, f"--top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> bool:
        """Whether to sample: asked for, or implied by a positive temperature or a top_p."""
        if self.temperature == 0:
            return False
        return self.do_sample or self.top_p is not None or (self.temperature is not None and self.temperature > 0)

    def describe(self) -> str:
        if not self.sampling:
            return "greedy"
        return f"sampling (temperature {self.temperature if self.temperature is not None else 1.0}, top_p {self.top_p if self.top_p is not None else 1.0})"

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate`` (besides token limits and special ids)."""
        out = {"do_sample": self.sampling}
        if self.sampling:
            out["temperature"] = self.temperature if self.temperature is not None else 1.0
            out["top_p"] = self.top_p if self.top_p is not None else 1.0
            out["top_k"] = 0
        return out


CHAT_FORMATS = ("auto", "chat", "chatml", "raw")


@_grouped
@dataclass
class ChatArguments:
    """``preftune chat`` options besides the model and generation settings."""

    format: str = _f("auto", "Prompt format: auto (what training used, from the run's record), chat (the tokenizer's template), chatml (preftune's default template), raw (text as typed).", "chat")
    system_prompt: str | None = _f(None, "System prompt for the conversation.", "chat")

    def __post_init__(self):
        _require(self.format in CHAT_FORMATS, f"--format must be one of {', '.join(CHAT_FORMATS)}, got {self.format!r}")


@_grouped
@dataclass
class EvalArguments:
    """``preftune eval`` options besides the model, data and tokenization settings.

    Data and tokenization flags left out take the run's own values (``run_config.json``), so a
    run folder is evaluated exactly as it was trained; flags given override them.
    """

    compare: str | None = _f(None, "A second model to put side by side; `base` = the model the run started from.", "eval")
    generate: int = _f(0, "Write N prompts with each model's answer to generations.md/.jsonl.", "eval")
    max_samples: int | None = _f(None, "Evaluate only the first N pairs.", "eval")
    batch_size: int = _f(8, "Pairs per forward pass.", "eval")
    beta: float | None = _f(None, "Reward scale beta (default: the run's, else 0.1).", "eval")
    output_dir: str | None = _f(None, "Where eval.json goes (default: MODEL's folder).", "eval")

    def __post_init__(self):
        _require(self.generate >= 0, f"--generate must be >= 0, got {self.generate}")
        _require(self.max_samples is None or self.max_samples >= 1, f"--max_samples must be at least 1, got {self.max_samples}")
        _require(self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}")
        _require(self.beta is None or self.beta > 0, f"--beta must be positive, got {self.beta}")


@_grouped
@dataclass
class MergeArguments:
    """``preftune merge`` options besides the adapter folder and how to load the base model."""

    output_dir: str | None = _f(None, "Folder to write the merged model to (required).", "merge")
    base_model: str | None = _f(None, "Base model to merge into (default: base_model_name_or_path in adapter_config.json).", "merge")
    overwrite: bool = _f(False, "Replace OUTPUT_DIR if it exists and is not empty.", "merge")

    def __post_init__(self):
        _require(bool(self.output_dir), "--output_dir is required: the folder to write the merged model to")


@_grouped
@dataclass
class ReportArguments:
    """``preftune report`` options besides the run folder."""

    output: str | None = _f(None, "Where to write the page (default RUN_DIR/report.html).", "report")
    max_generations: int = _f(20, "Show at most N sample generations.", "report")

    def __post_init__(self):
        _require(self.max_generations >= 0, f"--max_generations must be >= 0, got {self.max_generations}")


@_grouped
@dataclass
class ExportArguments:
    """``preftune export`` options besides the model and how to load it."""

    gguf: str | None = _f(None, "The GGUF file to write, e.g. model.gguf (required).", "export")
    quant: str = _f("q8_0", "Type of the weight matrices: q8_0 (8-bit blocks, about half the size of f16), f16, bf16, or f32 (exact).", "export")
    ollama: bool = _f(False, "Also write OUT.Modelfile for `ollama create` (chat template translated to Ollama's, stop tokens set).", "export")
    overwrite: bool = _f(False, "Replace the GGUF file (and its Modelfile) if they exist.", "export")

    def __post_init__(self):
        # --quant is checked by export_gguf before anything is loaded (its table lives with the writer)
        _require(bool(self.gguf), "--gguf is required: the GGUF file to write, e.g. --gguf model.gguf")


@_grouped
@dataclass
class ConvertArguments:
    """``preftune convert`` options besides the format and the two files."""

    max_pairs_per_question: int | None = _f(
        None, "Keep at most N incorrect answers per question, one pair each (default: all; 1 gives one pair per question).", "convert")
    overwrite: bool = _f(False, "Replace OUTPUT if it exists.", "convert")

    def __post_init__(self):
        _require(self.max_pairs_per_question is None or self.max_pairs_per_question >= 1,
                 f"--max_pairs_per_question must be at least 1, got {self.max_pairs_per_question}; leave it out to keep every incorrect answer")


@_grouped
@dataclass
class VerifyArguments:
    """``preftune verify`` options besides the run folder."""

    sizes_only: bool = _f(False, "Compare file sizes only, without reading the files (instant; blind to damage that keeps the size).", "verify")


GROUP_TITLES = {
    "model": "Model",
    "peft": "Parameter-efficient fine-tuning (LoRA, DoRA, QLoRA)",
    "reft": "Representation fine-tuning (LoReFT)",
    "data": "Data",
    "method": "Method and loss",
    "engine": "Engine and reliability",
    "training": "Training (transformers TrainingArguments; every familiar flag works)",
    "generation": "Generation",
    "chat": "Chat",
    "eval": "Evaluation",
    "merge": "Merge",
    "convert": "Convert",
    "export": "Export (GGUF)",
    "report": "Report",
    "verify": "Verify",
}

TRAIN_OPTIONS = (ModelArguments, DataArguments, PreftuneConfig)

# Training options that name files or folders. A run records them as absolute paths
# (:func:`with_absolute_paths`), so that `preftune train --resume_from_checkpoint`, eval, chat,
# merge and report find them from any working directory.
PATH_OPTIONS = ("output_dir", "chat_template_file", "dataset_cache_dir")  # always a local path
NAME_OR_PATH_OPTIONS = ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path", "dataset_name",
                        "eval_split")  # a local path, or a Hub name (--eval_split: or a split name)
MIXTURE_OPTIONS = ("datasets", "eval_datasets")  # lists of entries with a path: (or a file holding one)


def with_absolute_paths(options: dict) -> dict:
    """``options`` (option: value, as a YAML run file, ``run_config.json`` or the parsed options hold
    them; ``--dash-case`` keys too) with every local path absolute: :data:`PATH_OPTIONS` always, the
    values of :data:`NAME_OR_PATH_OPTIONS` that are local (:func:`preftune.hub.local_path_or_name`),
    and the entries of a mixture (a file naming one is read into the list it holds). Hub names,
    split names and every other value are unchanged."""
    import os

    from .data.mixture import entries_with_absolute_paths
    from .data.splits import read_entries
    from .hub import local_path_or_name

    out = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name in PATH_OPTIONS and isinstance(value, str):
            value = os.path.abspath(os.path.expanduser(value))
        elif name in NAME_OR_PATH_OPTIONS and isinstance(value, str):
            value = local_path_or_name(value)
        elif name in NAME_OR_PATH_OPTIONS and isinstance(value, list):
            value = [local_path_or_name(v) if isinstance(v, str) else v for v in value]
        elif name in MIXTURE_OPTIONS and value is not None:
            value = entries_with_absolute_paths(read_entries(value, name))
        out[key] = value
    return out


def field_groups(classes: tuple[type, ...] = TRAIN_OPTIONS) -> dict[str, str]:
    """Map every field of ``classes`` (default: the training options) to its help group.

    A field declared in a base class keeps that class's group; fields of classes that do not
    declare groups (transformers' ``TrainingArguments``) are "training".
    """
    out = {}
    for cls in classes:
        for f in fields(cls):
            declared = next((FIELD_GROUPS[c][f.name] for c in cls.__mro__ if f.name in FIELD_GROUPS.get(c, {})), "training")
            out[f.name] = declared
    return out
