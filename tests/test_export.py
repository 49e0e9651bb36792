"""``preftune export``: GGUF files checked by readers that did not write them.

* transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) must rebuild the source
  model: logits equal within 1e-5 for f32; for f16 / bf16 / q8_0 the weights it reads must equal
  the source weights rounded to that format by an independent reference (below), so the logits equal
  that rounded model's within 1e-5, and the distance to the unrounded model is printed;
* the tokenizer transformers builds from the GGUF metadata must give the run tokenizer's ids.

Q8_0, as ggml's reference quantizer defines it: each row is cut into blocks of 32 values;
``d = max|x| / 127`` (float32, stored as float16), ``q = round(x * (1/d))`` rounded half away
from zero, read back as ``q * float16(d)``.
"""

from __future__ import annotations

import json

import pytest
import torch

from _gguf_models import EDGE_TEXTS, LLAMA2_CHAT, hh_texts, one_line_error, qwen2_style_tokenizer, save_model, tiny
from _trained_runs import mark_finished
from conftest import LLAMA2_TOKENIZER
from preftune.cli import main

pytestmark = pytest.mark.slow


# --- references --------------------------------------------------------------------------------------
def q8_0_reference(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 round trip of ``w`` (module docstring), rows of ``w`` a multiple of 32 long."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    x = blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    a = x.abs()
    q = torch.sign(x) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a))))  # half away from zero, exactly
    return (q * d.half().float()).reshape(w.shape)


ROUND = {"f32": lambda w: w.float(), "f16": lambda w: w.half().float(), "bf16": lambda w: w.bfloat16().float(), "q8_0": q8_0_reference}


def rounded_copy(model, quant: str):
    """``model`` with every matrix rounded to ``quant`` the way the file stores it (vectors stay f32)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() == 2:
                p.copy_(ROUND[quant](p))
    return out


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    from preftune.inference_model import quiet_transformers

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def check_read_back(source, path, quant: str, ids: torch.Tensor) -> tuple[float, float]:
    """(max |logit diff| to the rounded source, to the exact source); weights must be the rounded ones exactly."""
    read = load_gguf(path)
    reference = rounded_copy(source, quant)
    mine, theirs = dict(reference.named_parameters()), dict(read.named_parameters())
    assert set(mine) == set(theirs)
    mismatched = [n for n in mine if not torch.equal(mine[n].float(), theirs[n].float())]
    assert mismatched == []  # q/k un-permuted by the reader, every value as rounded by the reference
    got = logits(read, ids)
    return (got - logits(reference, ids)).abs().max().item(), (got - logits(source, ids)).abs().max().item()


@pytest.fixture(scope="module")
def qwen2_tok():
    return qwen2_style_tokenizer()


# --- Llama + the real Llama-2 tokenizer, a LoRA run exported merged --------------------------------------
@pytest.fixture(scope="module")
def llama2_lora_run(tmp_path_factory):
    """A `preftune train --use_peft` run on a tiny random Llama with the real Llama-2 tokenizer."""
    if not LLAMA2_TOKENIZER.is_dir():
        pytest.skip("../shared/data/llama2-tokenizer is absent (needs the shared folder beside the repo)")
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("llama2_lora")
    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA2_TOKENIZER))
    tokenizer.chat_template = LLAMA2_CHAT
    base = save_model(root, tiny("llama", 32000, seed=5), tokenizer, "base")
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": f" It is {2 * i + 1}."} for i in range(16)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = root / "run"
    assert main(["train", "--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(run), "--use_peft",
                 "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "5e-2", "--max_steps", "3", "--per_device_train_batch_size", "8",
                 "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--memory_preflight", "false"]) == 0
    assert (run / "adapter_config.json").is_file()
    return base, run


@pytest.fixture(scope="module")
def llama2_exports(llama2_lora_run, tmp_path_factory):
    """The LoRA run exported as f32 and q8_0 through the CLI: {quant: path}."""
    _, run = llama2_lora_run
    out = tmp_path_factory.mktemp("llama2_gguf")
    paths = {quant: out / f"run-{quant}.gguf" for quant in ("f32", "q8_0")}
    for quant, path in paths.items():
        assert main(["export", str(run), "--gguf", str(path), "--quant", quant]) == 0
    return paths


def test_llama2_lora_run_exports_merged_f32_and_q8_0_and_transformers_reads_them_back(llama2_lora_run, llama2_exports):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.inference_model import load_pretrained

    base_dir, run = llama2_lora_run
    source = load_pretrained(str(run), torch_dtype="float32")  # the adapter merged into its base, as chat/eval load it
    texts = hh_texts(2) or EDGE_TEXTS[:3]
    ids = source.tokenizer([t[:400] for t in texts], add_special_tokens=False, padding=True, return_tensors="pt").input_ids[:, :96]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(run)).eval()
    assert (logits(unmerged, ids) - logits(source.model, ids)).abs().max().item() < 1e-4  # merged == base + adapter
    assert (logits(base, ids) - logits(source.model, ids)).abs().max().item() > 1e-3  # and the adapter moved it

    for quant, path in llama2_exports.items():
        to_rounded, to_exact = check_read_back(source.model, path, quant, ids)
        print(f"\nLlama-2 tokenizer, LoRA merged, {quant}: max |logit diff| {to_exact:.2e} to the source, {to_rounded:.2e} to the source rounded to {quant}")
        assert to_rounded <= 1e-5
        assert to_exact <= 1e-5 if quant == "f32" else 1e-4 < to_exact < 0.5
    assert llama2_exports["q8_0"].stat().st_size < llama2_exports["f32"].stat().st_size / 3  # 8.5 bits per weight instead of 32


def test_llama2_tokenizer_read_from_gguf_gives_the_run_tokenizer_ids(llama2_lora_run, llama2_exports):
    from transformers import AutoTokenizer

    from preftune.inference_model import encode_prompt, load_run_tokenizer

    _, run = llama2_lora_run
    mine = load_run_tokenizer(run, None, False)
    path = llama2_exports["q8_0"]
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chat = mine.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add 2 and 3."}], tokenize=False)
    assert chat.count("<s>") == 2 and "</s>" in chat  # the template's special tokens are in the text
    for text in EDGE_TEXTS + hh_texts(20) + [chat]:
        assert theirs(text, add_special_tokens=False).input_ids == mine(text, add_special_tokens=False).input_ids, text[:80]
    assert theirs(chat, add_special_tokens=False).input_ids.count(mine.bos_token_id) == 2
    # llama.cpp prepends BOS to a prompt as training did (add_bos_token), and nothing at the end
    assert theirs("Hi there").input_ids == encode_prompt(mine, "Hi there")
    assert theirs.chat_template == LLAMA2_CHAT


# --- other families and formats, on a small byte-level vocabulary ----------------------------------------
def test_qwen2_f32_f16_bf16_q8_0_read_back_and_byte_level_tokenizer_ids(qwen2_tok, tmp_path, capsys):
    from transformers import AutoTokenizer

    source = tiny("qwen2", len(qwen2_tok), seed=1)
    folder = save_model(tmp_path, source, qwen2_tok)
    text = "Each pair runs as one sequence with a mask that hides the chosen tokens from the rejected ones."
    ids = torch.tensor([qwen2_tok(text).input_ids[:48]])
    measured = {}
    for quant in ("f32", "f16", "bf16", "q8_0"):
        out = tmp_path / f"qwen2-{quant}.gguf"
        assert main(["export", str(folder), "--gguf", str(out), "--quant", quant]) == 0
        to_rounded, to_exact = check_read_back(source, out, quant, ids)
        measured[quant] = to_exact
        assert to_rounded <= 1e-5, quant
    with capsys.disabled():
        print("\nQwen2 max |logit diff| to the source: " + ", ".join(f"{q} {d:.2e}" for q, d in measured.items()))
    assert measured["f32"] <= 1e-5 and 0 < measured["f16"] < measured["bf16"]  # bf16 keeps 8 mantissa bits, f16 11
    assert "normalization" in capsys.readouterr().out  # NFC is said, since GGUF cannot carry it

    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="qwen2-f32.gguf")
    chat = qwen2_tok.apply_chat_template([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                          {"role": "user", "content": "Why?"}], tokenize=False, add_generation_prompt=True)
    for sample in EDGE_TEXTS + [chat, "<|endoftext|>text<|im_end|>"]:
        assert theirs(sample, add_special_tokens=False).input_ids == qwen2_tok(sample, add_special_tokens=False).input_ids, sample
    assert theirs(chat).input_ids.count(qwen2_tok.convert_tokens_to_ids("<|im_start|>")) == chat.count("<|im_start|>") == 5


def test_mistral_is_written_as_llama_architecture_with_its_head_dim(qwen2_tok, tmp_path):
    # head_dim 32 with 4 heads of a 64-wide model: the file must say so (attention.key_length)
    source = tiny("mistral", len(qwen2_tok), seed=2, head_dim=32, sliding_window=None)
    folder = save_model(tmp_path, source, qwen2_tok)
    out = tmp_path / "mistral.gguf"
    assert main(["export", str(folder), "--gguf", str(out), "--quant", "f32"]) == 0
    ids = torch.tensor([qwen2_tok("The second runs the test suite (a few minutes on 2 CPU cores).").input_ids])
    read = load_gguf(out)
    assert type(read).__name__ == "LlamaForCausalLM"  # llama.cpp runs Mistral as its llama architecture
    assert (logits(read, ids) - logits(source, ids)).abs().max().item() <= 1e-5


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_divisors(qwen2_tok, tmp_path):
    """llama.cpp divides each RoPE frequency base^(-2i/d) by rope_freqs[i]; that must give the
    frequencies transformers computes for Llama-3.1's scaling (transformers' loader ignores the tensor)."""
    import gguf
    import numpy as np

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    source = tiny("llama", len(qwen2_tok), rope_parameters=rope, max_position_embeddings=512)
    out = tmp_path / "llama3.gguf"
    assert main(["export", str(save_model(tmp_path, source, qwen2_tok)), "--gguf", str(out), "--quant", "f32"]) == 0
    reader = gguf.GGUFReader(str(out))
    divisors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.astype(np.float64)
    dim = source.config.hidden_size // source.config.num_attention_heads
    plain = 500000.0 ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    expected = source.model.rotary_emb.inv_freq.double().numpy()
    assert not np.allclose(plain, expected)  # the scaling changes some frequencies at this size
    np.testing.assert_allclose(plain / divisors, expected, rtol=1e-6)


# --- refusals -------------------------------------------------------------------------------------
def test_demo_reft_other_families_and_bad_outputs_are_refused_in_one_line(tmp_path, capsys, qwen2_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    from preftune.demo import build_demo_model, build_demo_tokenizer

    demo_tok = build_demo_tokenizer()
    demo = save_model(tmp_path, build_demo_model(len(demo_tok)), demo_tok, "demo")
    (demo / "run_config.json").write_text(json.dumps({"demo": True}), encoding="utf-8")
    mark_finished(demo)  # a finished run: readers verify it against its manifest first
    err = one_line_error(capsys, ["export", str(demo), "--gguf", str(tmp_path / "demo.gguf")])
    assert "word-level" in err and "GGUF cannot represent" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))  # nothing half-written

    reft = tmp_path / "reft"
    reft.mkdir()
    (reft / "reft_config.json").write_text("{}", encoding="utf-8")
    assert "ReFT interventions" in one_line_error(capsys, ["export", str(reft), "--gguf", str(tmp_path / "r.gguf")])

    gpt2 = save_model(tmp_path, GPT2LMHeadModel(GPT2Config(vocab_size=len(qwen2_tok), n_embd=32, n_layer=1, n_head=2)), qwen2_tok, "gpt2")
    err = one_line_error(capsys, ["export", str(gpt2), "--gguf", str(tmp_path / "g.gguf")])
    assert "Llama, Mistral, Qwen2" in err and "'gpt2'" in err

    qwen2 = save_model(tmp_path, tiny("qwen2", len(qwen2_tok)), qwen2_tok, "qwen2")
    assert ".gguf" in one_line_error(capsys, ["export", str(qwen2), "--gguf", str(tmp_path / "model.bin")])
    (tmp_path / "taken.gguf").write_text("keep me")
    assert "--overwrite" in one_line_error(capsys, ["export", str(qwen2), "--gguf", str(tmp_path / "taken.gguf")])
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    err = one_line_error(capsys, ["export", str(qwen2), "--gguf", str(tmp_path / "q.gguf"), "--quant", "q4_k"])
    assert "--quant must be one of f32, f16, bf16, q8_0" in err and "'q4_k'" in err
    assert not (tmp_path / "q.gguf").exists()
