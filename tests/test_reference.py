"""DPO reference models (preftune.reference): frozen copy, PEFT adapters off, precomputed + cached."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import FP32, tiny_llama
from preftune.config import DataArguments, ModelArguments, PreftuneConfig
from preftune.engine import sequence_logps
from preftune.layout import PairTokens, collate_pairs
from preftune.training_model import choose_device
from preftune.reference import ModelReference, PrecomputedReference, build_reference
from preftune.rundir import REF_CACHE_DIR

PAD = SimpleNamespace(pad_token_id=0)  # a tokenizer stand-in: build_reference only needs the pad id
CHOICE = choose_device("float32", "sdpa")


def make_pairs(n: int, seed: int, id_offset: int = 0, vocab: int = 97) -> list[PairTokens]:
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [PairTokens([1] + toks(1, 8), toks(1, 9) + [2], toks(1, 9) + [2], example_id=id_offset + i) for i in range(n)]


def make_args(tmp_path, **kw) -> PreftuneConfig:
    """fp32 (unless ``bf16`` is given): these tests compare reference tables with fp32 forwards
    (``direct``) and batchings that bf16 would round differently."""
    base = dict(output_dir=str(tmp_path / "out"), method="dpo", report_to="none", per_device_eval_batch_size=3,
                use_cpu=True, disable_tqdm=True, save_strategy="no", **FP32)
    base.update(kw)
    return PreftuneConfig(**base)


@torch.no_grad()
def direct(model, batch):
    model.eval()
    seq = sequence_logps(model, batch)
    return seq.chosen_sum, seq.rejected_sum


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


class DDPLike(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits in ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


# --- precomputed == on the fly ---------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_precomputed_equals_on_the_fly(tmp_path, layout):
    model = tiny_llama(seed=0)
    train, evals = make_pairs(13, seed=1), make_pairs(5, seed=2, id_offset=10**9)
    pre = build_reference(model, ModelArguments(), make_args(tmp_path, precompute_ref_log_probs=True), CHOICE, train, evals, PAD)
    otf = build_reference(model, ModelArguments(), make_args(tmp_path), CHOICE, train, evals, PAD)
    assert isinstance(pre, PrecomputedReference) and not pre.from_cache
    assert isinstance(otf, ModelReference) and otf.model is not model
    # batches composed differently from the precompute pass (which sorts by length, 3 per batch),
    # including train and eval pairs mixed and out of id order
    batches = [train[:8], train[8:], [train[5], evals[2], train[0], evals[4]]]
    worst = 0.0
    for pairs in batches:
        batch = collate_pairs(pairs, 0, layout)
        got = pre(model, batch)
        want = otf(model, batch)
        assert not got[0].requires_grad and not want[0].requires_grad
        assert got[0].shape == (len(pairs),)
        worst = max(worst, max_diff(got, want), max_diff(got, direct(model, batch)))
    print(f"precomputed vs on-the-fly max abs diff ({layout}): {worst:.2e}")
    assert worst <= 1e-5


def test_precomputed_rejects_unknown_ids_and_id_clashes(tmp_path):
    model = tiny_llama(seed=0)
    train = make_pairs(4, seed=1)
    pre = build_reference(model, ModelArguments(), make_args(tmp_path, precompute_ref_log_probs=True), CHOICE, train, [], PAD)
    stranger = PairTokens([1, 5], [6, 2], [7, 2], example_id=77)
    with pytest.raises(KeyError, match="77"):
        pre(model, collate_pairs([train[0], stranger], 0))
    clash = PairTokens([1, 5], [6, 2], [7, 2], example_id=train[0].example_id)
    with pytest.raises(ValueError, match="distinct ids"):
        build_reference(model, ModelArguments(), make_args(tmp_path, precompute_ref_log_probs=True), CHOICE, train, [clash], PAD)


def test_precomputed_table_is_computed_in_the_runs_mixed_precision(tmp_path):
    """Under --bf16 the reference pass runs in the trainer's autocast (as TRL's does): the table
    holds the policy's own bf16 log-probs, bit for bit when batched alike, and a bf16 table is
    another cache file than the fp32 one."""
    model = tiny_llama(seed=0)
    pairs = make_pairs(6, seed=1)
    # one pair per batch in the pass, so each single-pair batch below is batched alike
    tables = {bf16: build_reference(model, ModelArguments(), make_args(tmp_path, precompute_ref_log_probs=True, per_device_eval_batch_size=1,
                                                                      bf16=bf16), CHOICE, pairs, [], PAD) for bf16 in ("false", "true")}
    assert not tables["true"].from_cache and tables["true"].cache_path != tables["false"].cache_path
    apart = 0.0
    for pair in pairs:
        batch = collate_pairs([pair], 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate enters for the trainer's forward
            bf16_forward = direct(model, batch)
        assert max_diff(tables["true"](model, batch), bf16_forward) == 0.0
        assert max_diff(tables["false"](model, batch), direct(model, batch)) == 0.0
        apart = max(apart, max_diff(tables["true"](model, batch), tables["false"](model, batch)))
    assert 1e-5 < apart < 0.05  # bf16 really ran (sums of ~10 log-probs of ~-4.6, rounded at 2^-9 relative)


# --- PEFT: adapters off == a separate copy of the base --------------------------------------------
def _lora_policy(seed: int = 0, **overrides):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=seed, **overrides)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    return policy


def test_peft_adapters_off_equals_separate_base_copy(tmp_path):
    # attention dropout 0.5: if the reference pass ran in train mode, dropout would make it differ
    policy = _lora_policy(seed=0, attention_dropout=0.5)
    separate = tiny_llama(seed=0, attention_dropout=0.5).eval()  # same seed: the same base weights
    with torch.no_grad():  # non-zero adapters, as after some training
        g = torch.Generator().manual_seed(5)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ref = build_reference(policy, ModelArguments(use_peft=True), make_args(tmp_path), CHOICE, make_pairs(6, 1), [], PAD)
    assert isinstance(ref, ModelReference) and ref.adapters_off and ref.model is policy  # no second copy

    batch = collate_pairs(make_pairs(6, seed=1), 0)
    policy.eval()
    with_adapters_before = direct(policy, batch)
    policy.train()
    got = ref(DDPLike(policy), batch)  # the trainer may hand over a DDP wrapper
    want = direct(separate, batch)
    print(f"PEFT adapters-off vs separate base copy max abs diff: {max_diff(got, want):.2e}")
    assert max_diff(got, want) <= 1e-5
    assert not got[0].requires_grad
    assert policy.training, "the reference pass must restore train mode"
    # the adapters matter (so the equality above is not trivial) and are enabled again afterwards
    assert max_diff(with_adapters_before, want) > 1e-2
    assert max_diff(direct(policy, batch), with_adapters_before) == 0.0


def test_peft_precompute_cache_ignores_adapter_settings(tmp_path):
    """The adapters-off reference is the base alone: new LoRA settings reuse the cache, a new base does not."""
    from peft import LoraConfig, get_peft_model

    pairs = make_pairs(6, seed=1)
    args = lambda: make_args(tmp_path, precompute_ref_log_probs=True)  # noqa: E731
    first = build_reference(_lora_policy(seed=0), ModelArguments(use_peft=True), args(), CHOICE, pairs, [], PAD)
    torch.manual_seed(123)  # other random LoRA A matrices, other rank and targets
    other_lora = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["k_proj"]))
    second = build_reference(other_lora, ModelArguments(use_peft=True), args(), CHOICE, pairs, [], PAD)
    assert not first.from_cache and second.from_cache
    # the plain base model (a full fine-tune's starting policy) is the same reference function
    assert build_reference(tiny_llama(seed=0), ModelArguments(), args(), CHOICE, pairs, [], PAD).from_cache
    third = build_reference(_lora_policy(seed=1), ModelArguments(use_peft=True), args(), CHOICE, pairs, [], PAD)
    assert not third.from_cache


class GradRecorder:
    """Records torch.is_grad_enabled() at every decoder forward."""

    def __init__(self, model):
        self.modes = []
        decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        decoder.register_forward_hook(lambda *a: self.modes.append(torch.is_grad_enabled()))


@pytest.mark.parametrize("kind", ["frozen_copy", "peft_adapters_off", "precomputed_policy", "precomputed_peft"])
def test_reference_passes_never_build_gradients(tmp_path, kind):
    peft = "peft" in kind
    policy = _lora_policy(seed=0) if peft else tiny_llama(seed=0)
    policy.train()
    pairs = make_pairs(5, seed=1)
    args = make_args(tmp_path, precompute_ref_log_probs="precomputed" in kind)
    recorder = GradRecorder(policy)
    ref = build_reference(policy, ModelArguments(use_peft=peft), args, CHOICE, pairs, [], PAD)
    if kind == "frozen_copy":
        recorder = GradRecorder(ref.model)
    out = ref(policy, collate_pairs(pairs, 0))  # under grad mode, as inside the trainer's compute_loss
    assert recorder.modes and not any(recorder.modes), recorder.modes
    assert not out[0].requires_grad and out[0].grad_fn is None
    assert policy.training


# --- separate frozen models -------------------------------------------------------------------------
def test_default_full_finetune_reference_is_frozen_copy_of_start(tmp_path):
    policy = tiny_llama(seed=0)
    batch = collate_pairs(make_pairs(5, seed=3), 0)
    start = direct(policy, batch)
    ref = build_reference(policy, ModelArguments(), make_args(tmp_path), CHOICE, [], [], PAD)
    assert isinstance(ref, ModelReference) and ref.model is not policy
    assert not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():  # "train" the policy: the reference must not follow
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy.train()
    assert max_diff(direct(policy, batch), start) > 1e-3
    assert max_diff(ref(policy, batch), start) == 0.0


def test_ref_model_name_or_path_loads_that_model(tmp_path):
    other = tiny_llama(seed=3)
    other.save_pretrained(tmp_path / "ref")
    policy = tiny_llama(seed=0)
    batch = collate_pairs(make_pairs(5, seed=3), 0)
    ref = build_reference(policy, ModelArguments(), make_args(tmp_path, ref_model_name_or_path=str(tmp_path / "ref")), CHOICE, [], [], PAD)
    assert "separate frozen model" in ref.description
    assert max_diff(ref(policy, batch), direct(other, batch)) <= 1e-5
    assert max_diff(ref(policy, batch), direct(policy, batch)) > 1e-3
    # and precomputed from that folder, identified by its files without loading it again
    args = make_args(tmp_path, ref_model_name_or_path=str(tmp_path / "ref"), precompute_ref_log_probs=True)
    pairs = make_pairs(5, seed=3)
    pre = build_reference(policy, ModelArguments(), args, CHOICE, pairs, [], PAD)
    assert max_diff(pre(policy, batch), direct(other, batch)) <= 1e-5
    assert build_reference(policy, ModelArguments(), args, CHOICE, pairs, [], PAD).from_cache
    other2 = tiny_llama(seed=4)
    other2.save_pretrained(tmp_path / "ref")  # new weights in the same folder: a new fingerprint
    pre2 = build_reference(policy, ModelArguments(), args, CHOICE, pairs, [], PAD)
    assert not pre2.from_cache and pre2.fingerprint != pre.fingerprint
    assert max_diff(pre2(policy, batch), direct(other2, batch)) <= 1e-5


# --- the cache: reuse, invalidation, atomic single writer ---------------------------------------------
def demo_pairs(max_length: int, n_train: int = 40):
    from preftune.data.formats import ColumnMap, normalize_record
    from preftune.data.io import Record
    from preftune.data.tokenize import TokenizeSettings, tokenize_examples
    from preftune.demo import build_demo_tokenizer, demo_rows

    tok = build_demo_tokenizer()
    train_rows, eval_rows = demo_rows(n_train=n_train, n_eval=8)
    settings = TokenizeSettings(max_length=max_length, max_prompt_length=16)
    train = [normalize_record(Record(r, "t"), ColumnMap(), i) for i, r in enumerate(train_rows)]
    evals = [normalize_record(Record(r, "e"), ColumnMap(), 10**9 + i) for i, r in enumerate(eval_rows)]
    return tok, tokenize_examples(tok, train, settings)[0], tokenize_examples(tok, evals, settings)[0]


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.model.register_forward_hook(self)  # the decoder: every engine pass runs it

    def __call__(self, *args):
        self.calls += 1


def cache_files(tmp_path):
    return sorted((tmp_path / "out" / REF_CACHE_DIR).glob("*.safetensors"))


def test_cache_is_reused_and_invalidated(tmp_path):
    from preftune.demo import build_demo_model

    tok, train, evals = demo_pairs(max_length=32)
    model = build_demo_model(len(tok), seed=0)
    counter = ForwardCounter(model)
    args = lambda: make_args(tmp_path, precompute_ref_log_probs=True, per_device_eval_batch_size=8)  # noqa: E731
    margs = ModelArguments()

    first = build_reference(model, margs, args(), CHOICE, train, evals, tok)
    assert not first.from_cache and counter.calls == 6  # 48 pairs, 8 per batch
    [path] = cache_files(tmp_path)
    assert first.cache_path == path and path.stem == first.fingerprint
    mtime = path.stat().st_mtime_ns

    counter.calls = 0  # a later (or resumed) run: read, no forward pass, file untouched
    second = build_reference(model, margs, args(), CHOICE, train, evals, tok)
    assert second.from_cache and counter.calls == 0
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(second.chosen, first.chosen) and torch.equal(second.rejected, first.rejected)

    # a changed tokenizer setting: max_length 13 truncates some completions -> other pairs, new file
    _, train13, evals13 = demo_pairs(max_length=13)
    assert [p.chosen for p in train13] != [p.chosen for p in train]
    third = build_reference(model, margs, args(), CHOICE, train13, evals13, tok)
    assert not third.from_cache and counter.calls > 0 and third.fingerprint != first.fingerprint
    assert len(cache_files(tmp_path)) == 2

    # changed reference weights: new fingerprint, recomputed
    counter.calls = 0
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    fourth = build_reference(model, margs, args(), CHOICE, train, evals, tok)
    assert not fourth.from_cache and counter.calls > 0 and fourth.fingerprint != first.fingerprint


def test_stale_or_torn_cache_file_is_never_used(tmp_path):
    from safetensors.torch import save_file

    from preftune.demo import build_demo_model

    tok, train, evals = demo_pairs(max_length=32, n_train=16)

    model = build_demo_model(len(tok), seed=0)
    counter = ForwardCounter(model)
    args = lambda: make_args(tmp_path, precompute_ref_log_probs=True, per_device_eval_batch_size=8)  # noqa: E731
    good = build_reference(model, ModelArguments(), args(), CHOICE, train, evals, tok)
    path = good.cache_path
    # same file name, wrong content: values shifted and another fingerprint in the metadata
    save_file({"example_ids": good.example_ids, "chosen": good.chosen + 1.0, "rejected": good.rejected},
              str(path), metadata={"fingerprint": "0" * 64})
    counter.calls = 0
    again = build_reference(model, ModelArguments(), args(), CHOICE, train, evals, tok)
    assert not again.from_cache and counter.calls > 0
    assert torch.allclose(again.chosen, good.chosen, atol=1e-6)
    # a torn file (as a crash mid-write without the atomic rename would leave)
    path.write_bytes(path.read_bytes()[:50])
    counter.calls = 0
    third = build_reference(model, ModelArguments(), args(), CHOICE, train, evals, tok)
    assert not third.from_cache and counter.calls > 0
    assert torch.allclose(third.chosen, good.chosen, atol=1e-6)
    assert not list(path.parent.glob(".*.tmp")), "no temporary file is left behind"


def test_only_process_zero_writes_the_cache(tmp_path, monkeypatch):
    model = tiny_llama(seed=0)
    pairs = make_pairs(6, seed=1)
    monkeypatch.setattr(PreftuneConfig, "process_index", property(lambda self: 1))
    other_rank = build_reference(model, ModelArguments(), make_args(tmp_path, precompute_ref_log_probs=True), CHOICE, pairs, [], PAD)
    assert other_rank.cache_path is None and cache_files(tmp_path) == []
    monkeypatch.undo()
    rank0 = build_reference(model, ModelArguments(), make_args(tmp_path, precompute_ref_log_probs=True), CHOICE, pairs, [], PAD)
    assert len(cache_files(tmp_path)) == 1
    assert torch.equal(other_rank.chosen, rank0.chosen)  # every rank computes the same table


# --- DPO at step 0 through the real trainer -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["frozen_copy", "peft_adapters_off", "precomputed"])
def test_dpo_step0_is_log2_with_zero_rewards(tmp_path, kind):
    from preftune.trainer import PreferenceTrainer

    torch.manual_seed(0)
    policy = _lora_policy(seed=0) if kind == "peft_adapters_off" else tiny_llama(seed=0)
    train, evals = make_pairs(8, seed=1), make_pairs(6, seed=2, id_offset=10**9)
    args = make_args(tmp_path, precompute_ref_log_probs=kind == "precomputed", beta=0.1, learning_rate=1e-2,
                     per_device_train_batch_size=4, max_steps=1, logging_steps=1, eval_strategy="no")
    ref = build_reference(policy, ModelArguments(use_peft=kind == "peft_adapters_off"), args, CHOICE, train, evals, PAD)
    trainer = PreferenceTrainer(model=policy, args=args, train_pairs=train, eval_pairs=evals, reference=ref, pad_token_id=0)
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("chosen", "rejected", "margins"):
        assert abs(before[f"eval_rewards/{key}"]) <= 1e-6
    trainer.train()
    first = next(r for r in trainer.state.log_history if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the step-0 batch, before the update
    assert abs(first["rewards/margins"]) <= 1e-6
    after = trainer.evaluate()  # one update later the policy has left the reference
    assert abs(after["eval_rewards/chosen"]) > 1e-4


# --- through `preftune train` (run_training): cache written under output_dir, reused on resume ----------
def test_run_training_dpo_precompute_cache_reused_on_resume(tmp_path, monkeypatch):
    import json

    import preftune.reference.build as reference_module
    from preftune.demo import build_demo_model, build_demo_tokenizer
    from preftune.run import run_training

    tok = build_demo_tokenizer()
    build_demo_model(len(tok), seed=0).save_pretrained(tmp_path / "sft")  # the "SFT output" both runs start from
    tok.save_pretrained(tmp_path / "sft")
    # demo-vocabulary pairs with a preference learnable in a few steps: chosen digits 0-4, rejected 5-9
    rng = random.Random(0)
    digits = lambda lo, hi: " " + " ".join(str(rng.randint(lo, hi)) for _ in range(rng.randint(3, 5)))  # noqa: E731
    rows = [{"prompt": "Q: copy" + digits(0, 9) + " A:", "chosen": digits(0, 4), "rejected": digits(5, 9)} for _ in range(64)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(max_steps, resume=None):
        model_args = ModelArguments(model_name_or_path=str(tmp_path / "sft"), torch_dtype="float32", attn_implementation="sdpa")
        data_args = DataArguments(dataset_name=str(tmp_path / "pairs.jsonl"), eval_fraction=0.25, max_length=32, max_prompt_length=16)
        args = PreftuneConfig(output_dir=str(tmp_path / "out"), method="dpo", beta=0.1, precompute_ref_log_probs=True,
                              learning_rate=1e-2, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=max_steps,
                              logging_steps=2, save_strategy="steps", save_steps=4, report_to="none", use_cpu=True,
                              disable_tqdm=True, resume_from_checkpoint=resume)
        return run_training(model_args, data_args, args)

    first = run(4)
    [cache] = cache_files(tmp_path)
    mtime = cache.stat().st_mtime_ns
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    assert first.final_metrics["eval_rewards/margins"] > 0  # DPO moved away from the reference

    def no_forward(*a, **k):
        raise AssertionError("the reference pass ran again instead of reading the cache")

    monkeypatch.setattr(reference_module, "compute_reference_table", no_forward)
    resumed = run(8, resume="latest")
    assert cache_files(tmp_path) == [cache] and cache.stat().st_mtime_ns == mtime
    assert resumed.final_metrics["eval_rewards/margins"] > first.final_metrics["eval_rewards/margins"]
