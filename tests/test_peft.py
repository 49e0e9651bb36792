"""LoRA / DoRA / QLoRA through peft, ``preftune merge``, and the bitsandbytes checks.

QLoRA tests need bitsandbytes (``pip install 'preftune[quant]'``) and skip without it. Their tiny
model has hidden size 64, the smallest width bitsandbytes' own CPU inference repacking accepts
(preftune turns that repacking off, see preftune.quant, but the test must fail if it came back on).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama
from preftune.config import DataArguments, ModelArguments, PreftuneConfig
from preftune.errors import PreftuneError
from preftune.layout import PairTokens
from preftune.training_model import apply_peft
from preftune.trainer import PreferenceTrainer


def random_pairs(n: int, seed: int) -> list[PairTokens]:
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return torch.randint(lo, hi, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()

    return [PairTokens([1] + draw(3, 97), draw(3, 50) + [2], draw(50, 97) + [2], example_id=i) for i in range(n)]


TRAIN = random_pairs(64, seed=0)


def _train_args(tmp_path, **overrides) -> PreftuneConfig:
    settings = dict(output_dir=str(tmp_path / "run"), learning_rate=1e-2, lr_scheduler_type="constant", per_device_train_batch_size=16,
                    max_steps=4, logging_steps=100, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                    use_cpu=True, seed=0, weight_decay=0.0, beta=0.2)
    settings.update(overrides)
    return PreftuneConfig(**settings)


def _lora_args(**overrides) -> ModelArguments:
    settings = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    settings.update(overrides)
    return ModelArguments(**settings)


# --- LoRA / DoRA training changes only the adapter ---------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_and_dora_runs_change_only_adapter_weights(tmp_path, use_dora):
    model = apply_peft(tiny_llama(), _lora_args(use_dora=use_dora))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer = PreferenceTrainer(model=model, args=_train_args(tmp_path), train_pairs=TRAIN, pad_token_id=0)
    trainer.train()
    after = model.state_dict()
    adapter_keys = {k for k in before if "lora_" in k}
    base_keys = set(before) - adapter_keys
    assert len(base_keys) > 10
    changed_base = [k for k in base_keys if not torch.equal(before[k], after[k])]
    assert changed_base == []
    unchanged_adapter = [k for k in adapter_keys if torch.equal(before[k], after[k])]
    assert unchanged_adapter == []  # every lora_A, lora_B (and DoRA magnitude) moved
    if use_dora:
        assert any("lora_magnitude_vector" in k for k in adapter_keys)

    trainer.save_model(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)  # adapter only
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["use_dora"] is use_dora


# --- preftune merge ------------------------------------------------------------------------------------
def _adapter_folder(tmp_path, use_dora: bool):
    """A base model folder and a (randomised, so non-trivial) adapter folder naming it."""
    from transformers import AutoModelForCausalLM

    from preftune.demo import build_demo_tokenizer

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama(seed=3).save_pretrained(str(base_dir))
    tokenizer = build_demo_tokenizer()
    tokenizer.save_pretrained(str(base_dir))
    peft_model = apply_peft(AutoModelForCausalLM.from_pretrained(str(base_dir)), _lora_args(use_dora=use_dora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    return base_dir, adapter_dir, peft_model.eval()


def _one_line_error(capsys, argv) -> str:
    from preftune.cli import main

    capsys.readouterr()  # drop earlier output (progress bars of save_pretrained)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_equals_base_plus_adapter_and_loads_with_plain_transformers(tmp_path, use_dora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.cli import main

    _, adapter_dir, peft_model = _adapter_folder(tmp_path, use_dora)
    out = tmp_path / "merged"
    assert main(["merge", str(adapter_dir), "--output_dir", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("copy") == 9
    ids = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = merged(ids).logits
        base_only = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))(ids).logits
    diff = (got - expected).abs().max().item()
    print(f"\nmerge ({'DoRA' if use_dora else 'LoRA'}): max |merged - (base + adapter)| logits = {diff:.2e}")
    assert diff <= 1e-4
    assert (got - base_only).abs().max().item() > 1e-2  # the adapter is really in there
    assert not [p for p in tmp_path.iterdir() if ".merging-" in p.name]  # no temp folder left


def test_merge_refuses_to_overwrite_and_fails_in_one_line(tmp_path, capsys):
    from preftune.cli import main

    base_dir, adapter_dir, _ = _adapter_folder(tmp_path, use_dora=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err = _one_line_error(capsys, ["merge", str(adapter_dir), "--output_dir", str(out)])
    assert "--overwrite" in err and (out / "keep.txt").read_text() == "precious"
    assert main(["merge", str(adapter_dir), "--output_dir", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    capsys.readouterr()

    # base model named in adapter_config.json is gone: one line, and --base_model fixes it
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    err = _one_line_error(capsys, ["merge", str(adapter_dir), "--output_dir", str(tmp_path / "o2")])
    assert "moved-away" in err and "base model" in err
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    assert main(["merge", str(adapter_dir), "--output_dir", str(tmp_path / "o2"), "--base_model", str(base_dir)]) == 0
    capsys.readouterr()

    # no base model named at all
    config["base_model_name_or_path"] = None
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    assert "--base_model" in _one_line_error(capsys, ["merge", str(adapter_dir), "--output_dir", str(tmp_path / "o3")])
    # unreachable hub name (the hub is unreachable in tests)
    err = _one_line_error(capsys, ["merge", str(adapter_dir), "--output_dir", str(tmp_path / "o3"), "--base_model", "no-such-org/no-such-model"])
    assert "no-such-org/no-such-model" in err
    # not an adapter folder
    (tmp_path / "reft").mkdir()
    (tmp_path / "reft" / "reft_config.json").write_text("{}")
    assert "cannot be merged" in _one_line_error(capsys, ["merge", str(tmp_path / "reft"), "--output_dir", str(tmp_path / "o4")])
    assert "not found" in _one_line_error(capsys, ["merge", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o4")])


# --- bitsandbytes: optimizers and QLoRA on CPU ----------------------------------------------------------
def test_bitsandbytes_checks_fail_in_one_clear_line(monkeypatch):
    import importlib.util

    from preftune import quant

    quant.check_optimizer("adamw_torch", "cpu")  # not a bitsandbytes optimizer: nothing to check
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(PreftuneError, match=r"--optim paged_adamw_8bit needs bitsandbytes .*adamw_torch"):
        quant.check_optimizer("paged_adamw_8bit", "cpu")
    with pytest.raises(PreftuneError, match=r"--load_in_4bit needs bitsandbytes"):
        quant.check_quantization(ModelArguments(load_in_4bit=True), "cpu")
    monkeypatch.undo()

    bnb = pytest.importorskip("bitsandbytes")

    class Broken(bnb.optim.AdamW):
        def step(self, closure=None):
            raise NotImplementedError("no 8-bit kernel for this device\nsecond line")

    monkeypatch.setattr(bnb.optim, "AdamW", Broken)
    with pytest.raises(PreftuneError) as info:
        quant.check_optimizer("adamw_8bit", "cpu")
    msg = str(info.value)
    assert "\n" not in msg and "no 8-bit kernel" in msg and "optimizers that work here: adamw_torch" in msg
    assert "lion_8bit" in msg and "adamw_8bit," not in msg  # Lion still works; AdamW is the broken one


def test_bitsandbytes_8bit_optimizers_work_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    from preftune import quant

    for name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        quant.check_optimizer(name, "cpu")  # the probe passes here
    # and the 8-bit AdamW follows torch's AdamW (its state is really 8-bit)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 128, generator=g)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt8, opt32 = bnb.optim.AdamW([a], lr=1e-2, optim_bits=8, is_paged=True), torch.optim.AdamW([b], lr=1e-2)
    for _ in range(5):
        grad = torch.randn(64, 128, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        opt8.step()
        opt32.step()
    assert opt8.state[a]["state1"].dtype == torch.uint8
    step8, step32 = (a - w0).flatten(), (b - w0).flatten()
    cosine = torch.nn.functional.cosine_similarity(step8, step32, dim=0).item()
    print(f"\npaged_adamw_8bit vs torch AdamW on CPU, 5 steps: cosine of updates {cosine:.4f}")
    assert cosine > 0.95


def test_qlora_4bit_nf4_double_quant_trains_on_cpu_and_saves_the_adapter(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from preftune.demo import build_demo_tokenizer, demo_rows
    from preftune.training_model import choose_device, load_model
    from preftune.run import run_training

    tokenizer = build_demo_tokenizer()
    model_dir = tmp_path / "tiny64"
    tiny_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=64).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(n_train=48, n_eval=1)[0]))
    model_args = _lora_args(model_name_or_path=str(model_dir), load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)

    # what load_model gives the run: NF4 weights with double-quantized constants
    quantized = load_model(str(model_dir), model_args, choose_device("float32"))
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    del quantized

    data_args = DataArguments(dataset_name=str(data), eval_fraction=0.25, max_length=32, max_prompt_length=16)
    args = _train_args(tmp_path, output_dir=str(tmp_path / "qlora"), max_steps=4, per_device_train_batch_size=8, optim="paged_adamw_8bit",
                       eval_strategy="steps", eval_steps=2, logging_steps=2)
    result = run_training(model_args, data_args, args)
    out = tmp_path / "qlora"
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # lora_B starts at zero: every one trained
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    losses = {k: round(float(v), 4) for k, v in result.final_metrics.items() if "loss" in k}
    print(f"\nQLoRA on CPU (NF4, double quant, paged_adamw_8bit): {losses}")
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert "eval_loss" in result.final_metrics


def test_qlora_gradients_on_cpu_are_the_same_after_an_evaluation():
    """bitsandbytes 0.50 repacks 4-bit weights for inference on AVX512-BF16 CPUs into a kernel without
    autograd; preftune.training_model.load_model turns that off, so evaluating mid-run (eval_steps) does not
    corrupt the gradients of the steps after it."""
    pytest.importorskip("bitsandbytes")
    import tempfile

    from preftune.training_model import choose_device, load_model

    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4).save_pretrained(folder)
        model_args = _lora_args(model_name_or_path=folder, load_in_4bit=True)
        ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        grads = []
        for evaluate_first in (False, True):
            base = load_model(folder, model_args, choose_device("float32"))
            torch.manual_seed(0)  # same lora_A initialisation both times
            model = apply_peft(base, model_args)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(0.01)  # non-zero B: gradients reach lora_A through the layers above
            if evaluate_first:
                model.eval()
                with torch.no_grad():
                    model(ids)
            model.train()
            model(ids, labels=ids).loss.backward()
            grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 1e-4
    assert (grads[0] - grads[1]).abs().max().item() < 1e-6
