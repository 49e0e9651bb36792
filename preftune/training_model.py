"""The model a training run starts from: device and precision choice, loading the base model and
tokenizer (with quantization), wrapping with PEFT. (Loading a *finished* run for chat, eval or
export is :mod:`preftune.inference_model`.)

The defaults the seeds compute by hand, done once for everyone:

* dtype ``auto``: bf16 on GPUs with bf16 support (compute capability >= 8), fp16 on older
  GPUs, fp32 on CPU;
* attention ``auto``: ``flash_attention_2`` when the ``flash_attn`` package and a supporting GPU
  are present, else ``sdpa`` (PyTorch's fused attention); with the packed layout, as segment
  attention over that kernel (:mod:`preftune.attention`: no ``(T, T)`` mask, FlashAttention
  varlen on GPUs).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PreftuneError, describe_exception
from .hf_helpers import torch_dtype_of

logger = logging.getLogger(__name__)

__all__ = ["DeviceChoice", "choose_device", "load_tokenizer", "load_model", "causal_lm_from_pretrained", "apply_peft", "hub_error"]


@dataclass
class DeviceChoice:
    device: str
    dtype: torch.dtype
    attn_implementation: str

    def describe(self, quantized: str | None = None) -> str:
        """The start-up line's device, weights and attention; ``quantized`` names a bitsandbytes
        storage ("4-bit nf4"), whose computation runs in :attr:`dtype`."""
        from .attention import base_implementation

        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        weights = f"{quantized} weights ({name} compute)" if quantized else f"{name} weights"
        base = base_implementation(self.attn_implementation)
        if base is None:
            attention = self.attn_implementation
        elif base == "flash_attention_2":
            attention = "segments (prefix sharing, FlashAttention varlen)"
        else:
            attention = f"segments (prefix sharing, {base} per segment)"
        return f"device {self.device}, {weights}, attention {attention}"


def choose_device(torch_dtype: str = "auto", attn_implementation: str = "auto", batch_layout: str = "packed") -> DeviceChoice:
    """Pick device, dtype and attention kernel; see the module docstring."""
    if torch.cuda.is_available():
        device = "cuda"
        major, _ = torch.cuda.get_device_capability()
        auto_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        has_flash = importlib.util.find_spec("flash_attn") is not None and major >= 8
    else:
        device = "cpu"
        auto_dtype = torch.float32
        has_flash = False
    auto_attn = "flash_attention_2" if has_flash else "sdpa"
    dtype = torch_dtype_of(torch_dtype) or auto_dtype
    attn = auto_attn if attn_implementation == "auto" else attn_implementation
    if batch_layout == "packed":
        from .attention import SEGMENT_BASES, segment_implementation

        if attn not in SEGMENT_BASES:
            logger.warning("%s cannot run the packed layout's segment attention; using sdpa (or pass --batch_layout padded)", attn)
            attn = "sdpa"
        attn = segment_implementation(attn)
    return DeviceChoice(device, dtype, attn)


def hub_error(kind: str, name: str, err: Exception) -> PreftuneError:
    from .hub import looks_like_local_path, offline_reason

    if looks_like_local_path(name):
        return PreftuneError(f"the {kind} {name!r}: no such folder; check the path")
    offline = offline_reason()
    if offline:
        why = f"{offline} and it is not in the local cache"
        other = "unset that variable" if "offline mode" in offline else "set HF_ENDPOINT to a Hub mirror you can reach"
    else:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        why = f"loading it from the Hugging Face Hub failed ({first})"
        other = "check the name"
    return PreftuneError(
        f"the {kind} {name!r} is not a local folder, and {why}. "
        f"Download the {kind} on a machine with access (save_pretrained) and pass the local folder, or {other}."
    )


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _local_only(name: str) -> bool:
    """Hub names load from the local cache only when the Hub is unreachable (fails fast)."""
    from .hub import offline_mode

    return not _is_local(name) and offline_mode()


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=_local_only(name))
    except OSError as e:
        if _is_local(name):
            raise PreftuneError(f"cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
        raise hub_error("model", name, e) from None  # a tokenizer is read from a model's folder or Hub repository
    except Exception as e:  # network errors
        raise hub_error("model", name, e) from None
    if chat_template_file:
        path = Path(chat_template_file)
        if not path.is_file():
            raise PreftuneError(f"--chat_template_file {chat_template_file!r} not found")
        tok.chat_template = path.read_text(encoding="utf-8")
    if tok.pad_token_id is None:
        # Padding never enters a loss (positions are scored explicitly), so any id works.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _quantization_config(model_args, compute_dtype: torch.dtype):
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PreftuneError("--load_in_4bit/--load_in_8bit need bitsandbytes: pip install 'preftune[quant]'")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def causal_lm_from_pretrained(name: str, kind: str = "model", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` whose failures are one-line PreftuneErrors.

    A hub name is read from the local cache only when the Hub is unreachable (fails fast).
    ``kind`` names the model in messages ("model", "base model", "reference model").
    """
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("local_files_only", _local_only(name))
    if kwargs["local_files_only"]:
        # transformers looks for a PEFT adapter_config.json with its own options, which leave out
        # local_files_only: without this, that lookup alone retried the Hub 5 times (about 30 s)
        kwargs.setdefault("adapter_kwargs", {"local_files_only": True})
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        if _is_local(name):
            raise PreftuneError(f"cannot load the {kind} from {name!r}: {str(e).strip().splitlines()[0]}") from None
        raise hub_error(kind, name, e) from None
    except ValueError as e:
        raise PreftuneError(f"cannot load the {kind} {name!r}: {str(e).strip().splitlines()[0]}") from None
    except Exception as e:
        if _is_local(name):  # a damaged or foreign file (e.g. a truncated safetensors header)
            raise PreftuneError(f"cannot load the {kind} from {name!r} ({describe_exception(e)})") from e
        raise hub_error(kind, name, e) from None


def load_model(name: str, model_args, choice: DeviceChoice):
    quant = _quantization_config(model_args, choice.dtype)
    kwargs = dict(dtype=choice.dtype, attn_implementation=choice.attn_implementation, trust_remote_code=model_args.trust_remote_code)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = causal_lm_from_pretrained(name, kind="model", **kwargs)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        from .quant import keep_4bit_trainable_on_cpu

        keep_4bit_trainable_on_cpu(model)  # else, on CPU, gradients go wrong after the first evaluation
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def apply_peft(model, model_args, gradient_checkpointing: bool = False):
    """Wrap ``model`` with LoRA/DoRA adapters as ``model_args`` asks; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    target = model_args.lora_target_modules
    targets = "all-linear" if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        use_dora=model_args.use_dora,
        use_rslora=model_args.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning per run
            # that the user can do nothing about
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise PreftuneError(f"cannot apply LoRA: {str(e).splitlines()[0]} (check --lora_target_modules)") from None
