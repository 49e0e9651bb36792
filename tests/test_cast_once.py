"""Frozen weights cast once under mixed precision (``--linear_kernel auto`` with bf16/fp16,
preftune/linear_kernel.py): bit-for-bit what autocast computes, a copy made once and made again
when the weight changes, trainable and unregistered weights left to autocast, the LM head's kept
cast, weights a bf16 checkpoint held exactly stored in bf16 (and given back), the tensors that must
stay float32, the run-level resolution, bf16 LoRA trainer runs against ``--linear_kernel default``,
and ``--eval_generate`` generating from float32 weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from preftune import linear_kernel
from preftune.linear_kernel import cast_weight, disable_linear_kernel, enable_linear_kernel, linear, linear_kernel_of, release_cast_copies
from test_linear_kernel import _lora_model  # a 2-layer PEFT LoRA model with random A and B

BF16 = torch.bfloat16


def _frozen_bases(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def _step(model, x):
    """Forward + backward under CPU bf16 autocast; returns the output and every gradient."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _kept(t):
    return linear_kernel._CAST_ONCE[t].copy


def _unused(t):
    """Registered, with no copy made and float32 values in place."""
    kept = linear_kernel._CAST_ONCE.get(t)
    return kept is not None and kept.copy is None and not kept.stored and t.dtype == torch.float32


def test_kept_casts_give_autocast_bits_and_are_made_once():
    plain = _lora_model()
    fast = copy.deepcopy(plain)
    bases = _frozen_bases(fast)
    assert len(bases) == 2
    assert enable_linear_kernel(fast, "cast_once") == 2  # the frozen bases only: A and B train
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1))
    want = _step(plain, x)
    got = _step(fast, x)
    assert torch.equal(got[0], want[0]) and got[0].dtype == BF16
    assert torch.equal(got[1], want[1])
    assert want[2].keys() == got[2].keys() and len(got[2]) == 4  # lora_A and lora_B of both layers
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    copies = {id(_kept(m.weight)) for m in bases}
    assert all(_kept(m.weight).dtype == BF16 for m in bases) and _kept(bases[0].bias).dtype == BF16
    _step(fast, x)
    assert {id(_kept(m.weight)) for m in bases} == copies  # the second step casts nothing
    release_cast_copies(fast)
    assert all(_unused(m.weight) for m in bases)
    disable_linear_kernel(fast)
    assert not any(m.weight in linear_kernel._CAST_ONCE for m in bases)
    assert not any("forward" in vars(m) for m in fast.modules())


@pytest.mark.parametrize("change", ["in place", "new storage"])
def test_a_changed_weight_is_cast_again(change):
    layer = torch.nn.Linear(16, 8).requires_grad_(False)
    enable_linear_kernel(layer, "cast_once")
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=BF16):
        layer(x)
        first = _kept(layer.weight)
        if change == "in place":
            with torch.no_grad():
                layer.weight.mul_(-2.0)
        else:
            layer.weight.data = torch.randn(8, 16)
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)  # autocast's own cast of the current weight
    assert _kept(layer.weight) is not first
    assert torch.equal(got, want)


def test_trainable_unregistered_and_float32_paths_are_untouched():
    gen = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(6, 12, generator=gen), torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    frozen = torch.nn.Linear(12, 5).requires_grad_(False)
    enable_linear_kernel(frozen, "cast_once")
    # without autocast: float32 F.linear on the float32 weight, no copy made
    assert torch.equal(frozen(x), F.linear(x, frozen.weight, frozen.bias))
    assert _unused(frozen.weight)
    # a trainable weight is never registered and keeps its float32 gradient through autocast's cast
    trained = torch.nn.Linear(12, 5)
    assert enable_linear_kernel(trained, "cast_once") == 0 and trained.weight not in linear_kernel._CAST_ONCE
    w_a, w_b = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        linear(x, w_a, b).float().sum().backward()
        F.linear(x, w_b, b).float().sum().backward()
    assert w_a.grad.dtype == torch.float32 and torch.equal(w_a.grad, w_b.grad)
    # cast_weight: float32 asked, or a tensor nobody registered: a plain .to
    assert cast_weight(frozen.weight, torch.float32) is frozen.weight
    assert torch.equal(cast_weight(w, BF16), w.to(BF16)) and w not in linear_kernel._CAST_ONCE


@pytest.mark.parametrize("head_trains", [False, True])
def test_lm_head_uses_the_kept_cast_of_a_frozen_head(head_trains):
    """The chunked head in bf16 (as under mixed precision): the same log-probs and gradients with a
    registered head as without; a frozen head is cast once, a trained one every call."""
    from preftune.logprobs import chunked_token_logps

    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(24, 50, bias=False).requires_grad_(head_trains)
    twin = copy.deepcopy(head)
    enable_linear_kernel(head, "cast_once")
    h = torch.randn(9, 24, generator=gen)
    y = torch.randint(0, 50, (9,), generator=gen)

    def run(layer):
        hidden = h.clone().requires_grad_(True)
        logp = chunked_token_logps(hidden, layer.weight, y, chunk_size=4, compute_dtype=BF16)
        (logp * torch.linspace(0.5, 1.5, 9)).sum().backward()
        return logp.detach(), hidden.grad, None if layer.weight.grad is None else layer.weight.grad.clone()

    want, got = run(twin), run(head)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    if head_trains:
        assert head.weight not in linear_kernel._CAST_ONCE and got[2] is not None
    else:
        first = _kept(head.weight)
        run(head)
        assert _kept(head.weight) is first and first.dtype == BF16


def _args(tmp_path, **kw):
    from preftune.config import PreftuneConfig

    return PreftuneConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", **kw)


def test_resolution_and_what_the_run_reports(tmp_path):
    from preftune.run import _linear_kernel_label

    bf16 = _args(tmp_path, bf16="true")
    assert linear_kernel_of(bf16) == "cast_once"
    assert _linear_kernel_label(bf16) == "F.linear under autocast, frozen weights cast once"
    assert linear_kernel_of(_args(tmp_path, bf16="true", linear_kernel="default")) == "default"
    # checkpointing replays the casts to save memory: kept copies would undo that
    assert linear_kernel_of(_args(tmp_path, bf16="true", gradient_checkpointing=True)) == "default"
    assert linear_kernel_of(_args(tmp_path, bf16="true", selective_checkpointing="true")) == "default"
    assert linear_kernel_of(_args(tmp_path, bf16="true", selective_checkpointing="mlp")) == "cast_once"
    assert linear_kernel_of(_args(tmp_path, bf16="false")) in ("onednn", "default")


def _round_to_bf16_(model):
    """Every parameter rounded to bf16 and kept float32: a bf16 checkpoint loaded in float32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(BF16).float())
    return model


def _how_kept(t):
    kept = linear_kernel._CAST_ONCE.get(t)
    return "absent" if kept is None else "stored" if kept.stored else "copy" if kept.copy is not None else "unused"


def test_weights_exact_in_bf16_are_stored_in_bf16_and_given_back():
    """A frozen float32 weight that bf16 represents exactly is replaced by its bf16 values at the
    first cast (half the memory, no second copy): the same outputs and gradients as autocast, float32
    results outside autocast, and the float32 tensor back, equal, when the copies are released."""
    plain = _round_to_bf16_(_lora_model())
    fast = copy.deepcopy(plain)
    originals = {n: p.detach().clone() for n, p in fast.named_parameters()}
    enable_linear_kernel(fast, "cast_once")
    bases = _frozen_bases(fast)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1))
    want, got = _step(plain, x), _step(fast, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    assert [_how_kept(t) for m in bases for t in (m.weight, m.bias) if t is not None] == ["stored"] * 3
    assert all(m.weight.dtype == BF16 and _kept(m.weight) is None for m in bases)
    y32 = fast(x)  # outside autocast: float32, as from the float32 weights
    assert y32.dtype == torch.float32 and torch.equal(y32, plain(x))
    release_cast_copies(fast)
    for name, p in fast.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, originals[name]), name


@pytest.mark.parametrize("case", ["tied", "untied", "dora"])
def test_shared_head_and_dora_weights_stay_float32(case):
    """Tensors read outside the linear layers keep float32 (a copy beside them instead): a tied
    embedding, the LM head (the engine reads it), a DoRA layer's base weight (PEFT takes its norm)."""
    from conftest import tiny_llama
    from test_peft import _lora_args
    from preftune.hf_helpers import unwrap_model
    from preftune.training_model import apply_peft

    model = apply_peft(_round_to_bf16_(tiny_llama(tie_word_embeddings=case == "tied")), _lora_args(use_dora=case == "dora"))
    enable_linear_kernel(model, "cast_once")
    with torch.autocast("cpu", dtype=BF16):
        model(input_ids=torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))).logits.float().sum().backward()
    head = unwrap_model(model).get_output_embeddings().weight
    assert head.dtype == torch.float32 and _how_kept(head) in ("copy", "absent")
    decoder = [m for m in _frozen_bases(model) if m.weight is not head]
    assert decoder and {_how_kept(m.weight) for m in decoder} == ({"copy"} if case == "dora" else {"stored"})
    disable_linear_kernel(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("weights", ["float32", "exact_in_bf16"])
def test_bf16_lora_training_is_bit_identical_to_the_default_kernel(tmp_path, monkeypatch, weights):
    """Two bf16 LoRA optimizer steps with ``--linear_kernel auto`` (frozen weights cast once) and
    ``default`` (autocast casts every call): the same adapter weights to the bit; the trainer
    really ran every frozen layer from a kept copy, or from bf16 storage when the weights were a
    bf16 checkpoint's, and gave the float32 weights back, unchanged, when training ended."""
    from conftest import tiny_llama
    from test_peft import TRAIN, _lora_args, _train_args
    from preftune.trainer import PreferenceTrainer
    from preftune.training_model import apply_peft

    def base_model():
        model = tiny_llama()
        return _round_to_bf16_(model) if weights == "exact_in_bf16" else model

    kept_at_end = []
    release = linear_kernel.release_cast_copies

    def recording_release(model):
        kept_at_end.append(sorted((_how_kept(m.weight), m.weight.dtype == BF16) for m in _frozen_bases(model)))
        release(model)

    monkeypatch.setattr(linear_kernel, "release_cast_copies", recording_release)
    runs = {}
    for kernel in ("auto", "default"):
        model = apply_peft(base_model(), _lora_args())
        args = _train_args(tmp_path / kernel, bf16="true", max_steps=2, linear_kernel=kernel)
        trainer = PreferenceTrainer(model=model, args=args, train_pairs=TRAIN[:32], pad_token_id=0)
        trainer.train()
        runs[kernel] = (model, {n: p.detach().clone() for n, p in model.named_parameters()})
    fast, plain = runs["auto"][1], runs["default"][1]
    assert fast.keys() == plain.keys() and fast
    for name in plain:
        assert torch.equal(fast[name], plain[name]), name  # adapters, and the base weights given back
    bases = _frozen_bases(runs["auto"][0])
    decoder = len(bases) - 1  # all but the LM head
    stored = [("stored", True)] * decoder if weights == "exact_in_bf16" else []
    assert kept_at_end == [sorted([("copy", False)] * (len(bases) - len(stored)) + stored), [("absent", False)] * len(bases)]
    assert decoder > 10 and all(_unused(m.weight) for m in bases)
    assert not any(m.weight in linear_kernel._CAST_ONCE for m in _frozen_bases(runs["default"][0]))
    initial = apply_peft(base_model(), _lora_args())
    moved = [n for n, p in initial.named_parameters() if p.requires_grad and not torch.equal(p, plain[n])]
    assert moved


def test_eval_generate_gives_stored_weights_back_before_generating(tmp_path, monkeypatch):
    """``--eval_generate`` generates outside autocast between training steps: the weights held in
    bf16 get their float32 tensors back first (else each layer would upcast at every token)."""
    from preftune import evaluation
    from preftune.samples import SampleAnswersCallback

    model = _round_to_bf16_(_lora_model())
    enable_linear_kernel(model, "cast_once")
    _step(model, torch.randn(2, 4, 48))
    bases = _frozen_bases(model)
    assert all(m.weight.dtype == BF16 for m in bases)
    seen = []
    monkeypatch.setattr(evaluation, "generate_answers", lambda loaded, *a, **k: seen.append([m.weight.dtype for m in bases]) or {})

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "prompt"

    callback = SampleAnswersCallback(tmp_path, Tok(), [], max_new_tokens=4)
    callback._answers(model)
    assert seen == [[torch.float32] * len(bases)]


@pytest.mark.parametrize("sync", [False, True], ids=["frozen_reference", "tr_dpo"])
def test_separate_reference_stores_exact_weights_without_copies(tmp_path, monkeypatch, sync):
    """Full fine-tuning DPO in bf16 with a separate frozen reference, from a bf16-exact model: the
    reference's linear weights are held in bf16 during training (no copies: its head is cast per
    call as before), the policy trains bit-identically to ``--linear_kernel default``, and the
    reference is float32 and unchanged afterwards. Under TR-DPO, whose sync writes policy mixtures
    into the reference, its weights are left alone."""
    from conftest import tiny_llama
    from test_reference import CHOICE, PAD, make_args, make_pairs
    from preftune.config import ModelArguments
    from preftune.reference import build_reference
    from preftune.trainer import PreferenceTrainer

    seen = {}
    release = linear_kernel.release_cast_copies

    def recording_release(model):
        seen.setdefault(id(model), sorted(_how_kept(m.weight) for m in _frozen_bases(model)))
        release(model)

    monkeypatch.setattr(linear_kernel, "release_cast_copies", recording_release)
    train = make_pairs(8, seed=1)
    runs = {}
    for kernel in ("auto", "default"):
        policy = _round_to_bf16_(tiny_llama(seed=0))
        args = make_args(tmp_path / kernel, bf16="true", linear_kernel=kernel, beta=0.1, learning_rate=1e-2, per_device_train_batch_size=4,
                         max_steps=2, sync_ref_model=sync, ref_model_sync_steps=1)
        ref = build_reference(policy, ModelArguments(), args, CHOICE, train, [], PAD)
        start = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
        PreferenceTrainer(model=policy, args=args, train_pairs=train, reference=ref, pad_token_id=0).train()
        runs[kernel] = ({n: p.detach().clone() for n, p in policy.named_parameters()}, ref.model, start)
    for name, p in runs["default"][0].items():
        assert torch.equal(runs["auto"][0][name], p), name
    ref_model, start = runs["auto"][1], runs["auto"][2]
    n = len(_frozen_bases(ref_model))
    assert n > 10
    if sync:
        assert id(ref_model) not in seen or seen[id(ref_model)] == ["absent"] * n
        assert not any(m.weight in linear_kernel._CAST_ONCE for m in _frozen_bases(ref_model))
    else:
        assert seen[id(ref_model)] == sorted(["stored"] * (n - 1) + ["unused"])  # the head: no copy
        for name, p in ref_model.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p, start[name]), name
