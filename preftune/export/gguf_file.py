"""Writing one GGUF file: architecture metadata, tokenizer, tensors (through the ``gguf`` package).

Tensor types follow llama.cpp's converter: one-dimensional tensors (norm weights, biases, RoPE
divisors) stay float32; matrices are written in the requested type. ``q8_0`` stores blocks of 32
consecutive values of a row as one float16 scale ``d = max|x| / 127`` and 32 int8
``q = round(x / d)`` (rounded half away from zero), read back as ``q * d``; a matrix whose rows are
not a multiple of 32 long falls back to float16 (said in the notes).

The file is written beside its destination under a temporary name and renamed into place when
complete, so an interrupted export never leaves a truncated ``.gguf``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PreftuneError
from .architectures import (
    Family,
    head_dim,
    llama3_rope_divisors,
    permute_for_interleaved_rope,
    rope_parameters,
)
from .vocab import GgufVocab

__all__ = ["QUANT_TYPES", "write_gguf", "gguf_tensors"]

# --quant value -> (tensor type of matrices, general.file_type), as gguf enum member names
QUANT_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


@dataclass
class GgufTensor:
    name: str  # llama.cpp's name, e.g. blk.0.attn_q.weight
    data: np.ndarray  # float32, in the row layout llama.cpp expects


def _arch_enum(name: str):
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def gguf_tensors(model, family: Family):
    """The model's weights as llama.cpp tensors (float32), in state-dict order; see architectures.py."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(_arch_enum(family.gguf_arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = {"attn_q": config.num_attention_heads, "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        yield GgufTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_divisors(rope, head_dim(config)))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the embedding doubles as the output layer
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PreftuneError(f"the model has a tensor {hf_name!r} that llama.cpp's {family.gguf_arch} architecture has no place for")
        data = tensor.detach().to("cpu").float().numpy()
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        if family.permute_qk and kind in heads:
            data = permute_for_interleaved_rope(data, heads[kind])
        yield GgufTensor(name, data)


def _encode(tensor: GgufTensor, quant: str, notes: list[str]):
    """(array, gguf tensor type) of one tensor in the file's type (module docstring)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[QUANT_TYPES[quant][0]]
    if tensor.data.ndim <= 1 or tensor.name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(tensor.data, qtype), qtype
    except gguf.QuantError:
        notes.append(f"{tensor.name}: rows of {tensor.data.shape[-1]} values are not a multiple of the {quant} block size; written as f16")
        return gguf.quants.quantize(tensor.data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _add_architecture(writer, family: Family, config, vocab_size: int) -> None:
    import gguf

    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)


def _add_vocab(writer, vocab: GgufVocab, chat_template: str | None) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)  # training ends completions with EOS; prompts never carry one
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_gguf(path: Path, model, family: Family, vocab: GgufVocab, quant: str, name: str, chat_template: str | None) -> list[str]:
    """Write ``model`` with ``vocab`` to ``path`` as ``quant``; returns notes for the user."""
    import gguf

    notes: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(None, family.gguf_arch, use_temp_file=True)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[QUANT_TYPES[quant][1]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_architecture(writer, family, model.config, len(vocab.tokens))
        _add_vocab(writer, vocab, chat_template)
        for tensor in gguf_tensors(model, family):
            data, qtype = _encode(tensor, quant, notes)
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise PreftuneError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return notes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
