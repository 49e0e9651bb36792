"""The benchmark models: shapes, random initialisation, parameter counts by FLOP class.

* ``tiny``: the 19.5M-parameter Llama of the original benchmarks (vocabulary of Llama-2, hidden
  256, 4 layers, untied LM head), trained in full;
* ``qwen2-0.5b``: Qwen2-0.5B's shape (vocabulary 151,936, hidden 896, intermediate 4,864, 24
  layers, 14 query / 2 key-value heads, tied embeddings, q/k/v biases) with random weights, the
  size users train with LoRA.

Both are created once per benchmark run with ``torch.manual_seed(seed)``, saved with
``save_pretrained`` and loaded from there by every tool. Token ids come from the Llama-2
tokenizer (ids < 32,000 fit either vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TINY = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=4096, attention_dropout=0.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
QWEN2_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_dropout=0.0, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
)


@dataclass(frozen=True)
class ModelSpec:
    family: str  # transformers class prefix: Llama -> LlamaConfig, LlamaForCausalLM
    config: dict

    def build(self):
        import transformers

        config = getattr(transformers, f"{self.family}Config")(**self.config)
        return getattr(transformers, f"{self.family}ForCausalLM")(config)


MODELS = {"tiny": ModelSpec("Llama", TINY), "qwen2-0.5b": ModelSpec("Qwen2", QWEN2_05B)}
LORA_TARGETS = "all-linear"  # every projection of every layer, not the LM head


def tokenizer_dir(model_dir: Path) -> Path:
    """Where the benchmark's tokenizer lives: beside the model, not in its folder, where
    transformers would load it as the model type's tokenizer class (a Qwen2 tokenizer
    pre-tokenizes the Llama-2 vocabulary differently)."""
    return Path(model_dir) / "tokenizer"


def create_model(model_dir: Path, name: str, seed: int, source_tokenizer: Path, checkpoint_dtype: str = "float32") -> None:
    """Random-init model ``name``, save it to ``model_dir`` in ``checkpoint_dtype`` (``bfloat16``:
    as published checkpoints such as Qwen2-0.5B's are saved; every tool still loads it in float32)
    and the Llama-2 tokenizer to :func:`tokenizer_dir`.

    The tokenizer is saved with ``add_bos_token=True``: the shared Llama-2 ``tokenizer.json``
    adds no BOS by itself, while TRL 1.16's ORPOTrainer always prepends one. With BOS switched on
    in the tokenizer, preftune, TRL's ORPOTrainer and TRL's DPOTrainer all produce ``<s>`` + text.
    """
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    MODELS[name].build().to(getattr(torch, checkpoint_dtype)).save_pretrained(str(model_dir))
    AutoTokenizer.from_pretrained(str(source_tokenizer), add_bos_token=True).save_pretrained(str(tokenizer_dir(model_dir)))


def param_counts(name: str, lora_r: int = 0) -> dict:
    """Parameters by FLOP class: ``layers`` (decoder projections, biases and norms left out),
    ``head`` (the LM head: an embedding gather costs no FLOPs), ``lora`` (adapters on every
    projection for rank ``lora_r``), plus the sizes the FLOP and floor models need."""
    c = MODELS[name].config
    h, inter, n_layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o, k, v, gate/up/down
    # LoRA on a (d_in -> d_out) projection adds A (r x d_in) and B (d_out x r)
    lora_per_layer = lora_r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)
    return {
        "layers": per_layer * n_layers, "head": vocab * h, "lora": lora_per_layer * n_layers, "hidden": h,
        "intermediate": inter, "kv": kv, "heads": c["num_attention_heads"], "head_dim": head_dim, "n_layers": n_layers,
        "vocab": vocab, "tied": bool(c.get("tie_word_embeddings")), "lora_r": lora_r, "model": name,
    }
