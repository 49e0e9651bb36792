"""The oneDNN float32 linear (preftune/linear_kernel.py): values and gradients against float64,
the plain ``F.linear`` where it does not apply, what it keeps for the backward, wrapping a model's
layers, the LM head's fresh-logits path against its buffered path, and a trainer run against
``--linear_kernel default``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from preftune import linear_kernel
from preftune.linear_kernel import disable_linear_kernel, enable_linear_kernel, linear, onednn_applies, resolve_linear_kernel

pytestmark = pytest.mark.skipif(not linear_kernel.onednn_available(), reason="this PyTorch build has no oneDNN linear on the CPU")


def float64_linear(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _case(shape, out, bias, seed, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if transposed:  # a non-contiguous input: the transpose of a (in, T) tensor
        x = torch.randn(shape[-1], shape[0], generator=gen).t()
    w = torch.randn(out, shape[-1], generator=gen) * shape[-1] ** -0.5
    b = torch.randn(out, generator=gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape,out,bias,transposed", [
    ((7, 96), 33, True, False),
    ((2, 5, 64), 130, False, False),  # 3-D, as a decoder layer calls it
    ((9, 80), 17, True, True),
    ((1, 1, 8), 3, True, False),  # one token
])
def test_values_and_gradients_match_float64(shape, out, bias, transposed):
    x, w, b = _case(shape, out, bias, seed=len(shape) + out, transposed=transposed)
    assert onednn_applies(x, w, b)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    xs, ws = leaves[0], leaves[1]
    bs = leaves[2] if bias else None
    y = linear(xs, ws, bs)
    assert y.grad_fn is not None and "OneDNN" in type(y.grad_fn).__name__  # it really ran the oneDNN path
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = float64_linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, leaves, upstream)
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream.double())
    for name, got, want in zip("xwb", grads, ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_falls_back_to_f_linear_exactly_where_it_does_not_apply():
    x, w, b = _case((6, 40), 12, True, seed=1)
    # bf16 operands, a 1-D input and an empty input take F.linear itself: the same bits
    assert not onednn_applies(x.bfloat16(), w.bfloat16(), b.bfloat16())
    assert torch.equal(linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    assert not onednn_applies(x[0], w, b) and torch.equal(linear(x[0], w, b), F.linear(x[0], w, b))
    assert not onednn_applies(x[:0], w, b) and linear(x[:0], w, b).shape == (0, 12)
    assert not onednn_applies(x, w.double(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside F.linear; ours would not
        assert not onednn_applies(x, w, b)
        got = linear(x, w, b)
        assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(x, w, b))


def _saved_during(fn):
    """Tensors autograd saves while ``fn`` runs (their shapes)."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_keeps_what_f_linear_keeps():
    """A frozen weight (a LoRA base layer) keeps nothing of the input; a trained one keeps it."""
    x, w, _ = _case((5, 48), 20, False, seed=2)
    x = x.requires_grad_(True)
    saved, _ = _saved_during(lambda: linear(x, w))  # frozen weight: only W (a parameter, no copy) for dx
    assert (5, 48) not in saved
    saved, y = _saved_during(lambda: linear(x.detach(), w.clone().requires_grad_(True)))  # no input gradient: x for dW only
    assert (5, 48) in saved and (20, 48) not in saved
    y.sum().backward()


def test_wrapping_a_model_counts_skips_copies_and_undoes():
    class Scaled(torch.nn.Linear):  # a subclass (quantized layers are others) is not ours to change
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4), Scaled(4, 4))
    hooked = torch.nn.Linear(4, 4)
    model.append(hooked)
    hooked.forward = lambda x: x  # someone else's instance forward (accelerate's hooks): left alone
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model(x)
    assert enable_linear_kernel(model, "onednn") == 2
    assert enable_linear_kernel(model, "onednn") == 2  # idempotent: no wrapper on a wrapper
    assert "forward" in vars(model[0]) and "forward" not in vars(model[3])
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    twin = copy.deepcopy(model)
    assert twin[0].forward.__self__ is twin[0]  # bound to the copy, not to the original
    disable_linear_kernel(model)
    assert not any("forward" in vars(m) for m in list(model)[:4]) and "forward" in vars(hooked)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # back to F.linear: the same bits as before


def test_lm_head_fresh_logits_match_the_buffered_path(monkeypatch):
    """The chunked head's oneDNN logits (new per chunk) against its buffer path (``mm`` into one
    reused buffer): log-probs and the hidden-state gradient, for a frozen and a trained head."""
    from preftune.logprobs import chunked_token_logps

    gen = torch.Generator().manual_seed(4)
    n, hdim, vocab = 23, 32, 301
    hidden, weight = torch.randn(n, hdim, generator=gen), torch.randn(vocab, hdim, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)

    def run(frozen_head: bool):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(not frozen_head)
        logp = chunked_token_logps(h, w, targets, chunk_size=8)
        grads = torch.autograd.grad(logp, [h] if frozen_head else [h, w], upstream)
        return logp.detach(), grads

    for frozen_head in (True, False):
        fresh = run(frozen_head)
        with monkeypatch.context() as m:
            m.setattr(linear_kernel, "onednn_available", lambda: False)
            buffered = run(frozen_head)
        torch.testing.assert_close(fresh[0], buffered[0], rtol=1e-6, atol=1e-5)
        for a, b in zip(fresh[1], buffered[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        float64 = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(fresh[0].double(), float64, rtol=1e-6, atol=1e-5)


def test_the_probe_answers_the_same_inside_autocast():
    """The availability probe (cached) may first run inside a bf16 autocast region."""
    linear_kernel.onednn_available.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_kernel.onednn_available()
    finally:
        linear_kernel.onednn_available.cache_clear()


def test_resolving_the_setting(monkeypatch):
    from preftune.errors import PreftuneError

    assert resolve_linear_kernel("auto", "cpu") == "onednn"
    assert resolve_linear_kernel("onednn", "cpu") == "onednn"
    assert resolve_linear_kernel("default", "cpu") == "default"
    assert resolve_linear_kernel("auto", "cpu", mixed_precision=True) == "cast_once"
    assert resolve_linear_kernel("default", "cpu", mixed_precision=True) == "default"
    assert resolve_linear_kernel("onednn", "cuda") == "default"
    monkeypatch.setattr(linear_kernel, "onednn_available", lambda: False)
    assert resolve_linear_kernel("auto", "cpu") == "default"
    with pytest.raises(PreftuneError, match="no oneDNN linear"):
        resolve_linear_kernel("onednn", "cpu")


def test_setting_parses_and_refuses(tmp_path):
    from preftune.config import PreftuneConfig
    from preftune.errors import PreftuneError

    def setting(value):
        return PreftuneConfig(output_dir=str(tmp_path / "o"), linear_kernel=value, use_cpu=True).linear_kernel

    assert PreftuneConfig(output_dir=str(tmp_path / "o"), use_cpu=True).linear_kernel == "auto"
    assert [setting(v) for v in ("OneDNN", " default ")] == ["onednn", "default"]
    with pytest.raises(PreftuneError, match="must be auto, onednn or default, got 'mkl'"):
        setting("mkl")


def test_trainer_runs_it_and_lands_near_the_plain_run(tmp_path):
    """Two fp32 optimizer steps with ``--linear_kernel auto`` (oneDNN here) and ``default``: the
    decoder's linears really ran through oneDNN in the first, and the weights after the steps
    agree to float32 rounding (the two matmuls sum in different orders)."""
    from test_trainer import random_pairs, train_weights

    pairs = random_pairs(8, seed=4)
    common = dict(max_steps=2, per_device_train_batch_size=4, bf16="false")
    fast, t_fast = train_weights(tmp_path / "onednn", pairs, linear_kernel="auto", **common)
    plain, t_plain = train_weights(tmp_path / "plain", pairs, linear_kernel="default", **common)
    linears = [m for m in t_fast.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.forward.__func__.__name__ == "_linear_forward" for m in linears)
    assert not any("forward" in vars(m) for m in t_plain.model.modules() if type(m) is torch.nn.Linear)
    from conftest import tiny_llama

    initial = dict(tiny_llama(seed=3).named_parameters())
    moved = 0
    for name, w in plain.items():
        torch.testing.assert_close(fast[name], w, rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(w, initial[name]))
    assert moved > len(plain) // 2


def _lora_model(seed=0, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.Tanh(), torch.nn.Linear(80, 24, bias=False))
    # random B as well as A (PEFT's default B = 0 would leave every A gradient zero)
    config = dict(r=4, lora_alpha=12, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, LoraConfig(**{**config, **lora}))


def _float64_twin(model):
    twin = copy.deepcopy(model).double()
    disable_linear_kernel(twin)  # F.linear in float64: the reference
    return twin


@pytest.mark.parametrize("base_trains", [False, True])
def test_lora_layer_in_one_node_matches_float64(base_trains):
    """y = base(x) + s B(A(x)) as one node: values and the gradients of x, A, B (and of the base
    weight and bias when they train) against PEFT's own forward run in float64."""
    model = _lora_model()
    for name, p in model.named_parameters():
        if "base_layer" in name:
            p.requires_grad_(base_trains)
    reference = _float64_twin(model)
    assert enable_linear_kernel(model, "onednn") == 8  # 2 LoRA layers, each with its base, A and B
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = model(x)
    assert "OneDNNLoRALinear" in type(y.grad_fn).__name__
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference(x64)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    params = [p for p in model.parameters() if p.requires_grad]
    params64 = [p for p in reference.parameters() if p.requires_grad]
    assert len(params) == (7 if base_trains else 4)  # A and B of two layers; two base weights, one bias
    grads = torch.autograd.grad(y, [x, *params], upstream)
    grads64 = torch.autograd.grad(y64, [x64, *params64], upstream.double())
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_lora_layer_falls_back_to_peft_exactly():
    """Where the one-node form is not what PEFT computes (adapters disabled: a DPO reference;
    DoRA; dropout in effect) the layer runs PEFT's own forward: the same bits as the LoRA layer
    without its wrapper (its base, A and B still on the oneDNN linear in both)."""
    import contextlib

    from preftune.hf_helpers import unwrap_forward
    from preftune.linear_kernel import _FORWARDS

    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(7))
    cases = [(dict(), lambda m: m.disable_adapter()), (dict(use_dora=True), None), (dict(lora_dropout=0.5), None)]
    for lora, context in cases:
        model = _lora_model(**lora).train()
        enable_linear_kernel(model, "onednn")
        lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "forward" in vars(m)]
        assert len(lora_layers) == 2

        def run():
            torch.manual_seed(0)  # the same dropout masks
            with torch.no_grad(), (context(model) if context else contextlib.nullcontext()):
                return model(x)

        wrapped = run()
        for m in lora_layers:
            unwrap_forward(m, _FORWARDS)
        assert torch.equal(run(), wrapped), lora
    # and the wrapper is not a no-op where it applies: one node differs from PEFT's three in the last bits at most
    model = _lora_model()
    enable_linear_kernel(model, "onednn")
    with torch.no_grad():
        one_node = model(x)
    for m in model.modules():
        if hasattr(m, "lora_A"):
            unwrap_forward(m, _FORWARDS)
    with torch.no_grad():
        torch.testing.assert_close(model(x), one_node, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["mlp", "layers"])
def test_selective_checkpointing_is_exact_on_the_onednn_layers(mode):
    """The checkpointing settings change no bit when the LoRA layers run as one oneDNN node: the
    gated MLP's saved-tensor hook finds ``down``'s input among what the node keeps, and the
    selective policy keeps the oneDNN matmul outputs instead of replaying them."""
    from test_checkpointing import ENABLE, assert_same, loss_and_grads, make, with_lora
    from test_engine_equivalence import BATCHES, make_pairs

    model = with_lora(make("llama")).train()
    assert enable_linear_kernel(model, "onednn") > 0
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=7)
    plain = loss_and_grads(model, pairs)
    assert ENABLE[mode](model)
    assert_same(plain, loss_and_grads(model, pairs), f"llama + LoRA on oneDNN, {mode}")
