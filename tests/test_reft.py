"""Native LoReFT (preftune.reft): the formula, the positions, both layouts, training, saving, generation.

Interventions are perturbed away from their identity initialisation (``_perturb``) wherever a
test must see them act. The ORPO+ReFT demo test trains the built-in demo model briefly with full
fine-tuning (so it answers, but prefers the right answer on only ~3/4 of held-out prompts),
freezes it, then trains only ReFT interventions and measures held-out preference accuracy.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import tiny_llama
from preftune.config import ModelArguments, PreftuneConfig
from preftune.engine import sequence_logps
from preftune.errors import PreftuneError
from preftune.layout import PairTokens, collate_pairs
from preftune.linear_kernel import disable_linear_kernel
from preftune.reft import (
    LoReFT, attach_reft, disable_reft, get_reft, load_reft, parse_layers, parse_positions,
    reft_generate, reft_hooks,
)
from preftune.rundir import REFT_CONFIG_FILE as REFT_CONFIG, REFT_WEIGHTS_FILE as REFT_WEIGHTS
from preftune.trainer import PreferenceTrainer


def random_pairs(n: int, seed: int, id_offset: int = 0) -> list[PairTokens]:
    """Prompts of 1-8 tokens (BOS first); chosen from ids 3-49, rejected from 50-96."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi, kmin=2, kmax=6):
        k = int(torch.randint(kmin, kmax + 1, (1,), generator=g))
        return torch.randint(lo, hi, (k,), generator=g).tolist()

    return [PairTokens([1] + draw(3, 97, 0, 7), draw(3, 50) + [2], draw(50, 97) + [2], example_id=id_offset + i) for i in range(n)]


PAIRS = random_pairs(12, seed=0)
TRAIN = random_pairs(160, seed=1)
HELD_OUT = random_pairs(24, seed=2, id_offset=10**9)


def reft_args(layers="0,1", rank=4, positions="f1+l1", share=True) -> ModelArguments:
    return ModelArguments(reft_layers=layers, reft_rank=rank, reft_positions=positions, reft_share_weights=share)


def _perturb(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in get_reft(model).interventions.values():
            module.source.weight.add_(scale * torch.randn(module.source.weight.shape, generator=g))
            module.source.bias.add_(scale * torch.randn(module.source.bias.shape, generator=g))


def _context(model):
    """The batch context the engine must be given for ``model`` (None for a plain model)."""
    hooks = reft_hooks(model)
    return hooks.batch_context if hooks is not None else None


def _logps(model, pairs, layout="packed"):
    with torch.no_grad():
        return sequence_logps(model, collate_pairs(pairs, 0, layout), batch_context=_context(model))


def _max_diff(a, b) -> float:
    return max((getattr(a, k) - getattr(b, k)).abs().max().item() for k in ("chosen_sum", "rejected_sum", "nll_sum"))


def _orthonormality_error(model) -> float:
    errs = []
    for module in get_reft(model).interventions.values():
        R = module.R.detach().double()
        errs.append((R @ R.T - torch.eye(R.shape[0], dtype=torch.float64)).abs().max().item())
    return max(errs)


def _args(tmp_path, **overrides) -> PreftuneConfig:
    settings = dict(output_dir=str(tmp_path / "run"), learning_rate=3e-2, lr_scheduler_type="constant", per_device_train_batch_size=16,
                    max_steps=10, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                    use_cpu=True, seed=0, weight_decay=0.0, beta=0.2)
    settings.update(overrides)
    return PreftuneConfig(**settings)


# --- parsing -----------------------------------------------------------------------------------
def test_position_and_layer_syntax():
    assert parse_positions("f1+l1") == [("f", 1), ("l", 1)]
    assert parse_positions("l2") == [("l", 2)] and parse_positions("f3") == [("f", 3)]
    assert parse_layers("28, 18") == [18, 28]
    for bad in ("", "x1", "f0", "f1+f2", "f1,l1", "l"):
        with pytest.raises(PreftuneError, match="--reft_positions"):
            parse_positions(bad)
    with pytest.raises(PreftuneError, match="--reft_layers"):
        parse_layers("a,b")
    with pytest.raises(PreftuneError, match="--reft_positions"):  # caught in the config, before any model loads
        reft_args(positions="first")
    with pytest.raises(PreftuneError, match="decoder layers"):
        attach_reft(tiny_llama(), reft_args(layers="5"))


# --- the intervention ------------------------------------------------------------------------------
def test_loreft_formula_orthonormal_rows_and_identity_init():
    torch.manual_seed(0)
    module = LoReFT(hidden_size=16, rank=3)
    h = torch.randn(7, 16)
    # identity at initialisation (W = R, b = 0)
    assert (module(h) - h).abs().max().item() < 1e-6
    with torch.no_grad():
        module.source.weight.normal_()
        module.source.bias.normal_()
    R = module.R.detach().double()
    assert (R @ R.T - torch.eye(3, dtype=torch.float64)).abs().max().item() < 1e-6
    # h + R^T (W h + b - R h), in float64 by hand
    W, b, hd = module.source.weight.detach().double(), module.source.bias.detach().double(), h.double()
    expected = hd + (hd @ W.T + b - hd @ R.T) @ R
    assert (module(h).double() - expected).abs().max().item() < 1e-5
    # in the subspace the edited state is W h + b; outside it, h is kept
    out = module(h).double()
    assert (out @ R.T - (hd @ W.T + b)).abs().max().item() < 1e-5
    P = torch.eye(16, dtype=torch.float64) - R.T @ R
    assert (out @ P - hd @ P).abs().max().item() < 1e-5


def test_attached_at_init_is_the_base_model():
    base = tiny_llama()
    model = attach_reft(tiny_llama(), reft_args())
    assert _max_diff(_logps(model, PAIRS), _logps(base, PAIRS)) < 1e-5


@pytest.mark.parametrize("positions,share", [("f2+l1", True), ("f2+l1", False), ("l3", True)])
def test_interventions_act_exactly_at_prompt_positions_of_packed_rows(positions, share):
    model = attach_reft(tiny_llama(), reft_args(layers="0", positions=positions, share=share))
    _perturb(model)
    batch = collate_pairs(PAIRS, 0, "packed", row_budget=48)
    rows, seq_len = batch["input_ids"].shape
    assert rows < len(PAIRS)  # several prompts share a row
    expected = set()
    spec = parse_positions(positions)
    for row, start, length in batch["prompt_spans"].tolist():
        for kind, k in spec:
            offsets = range(min(k, length)) if kind == "f" else range(max(length - k, 0), length)
            expected |= {row * seq_len + start + j for j in offsets}
    layer0 = model.model.layers[0]
    seen = []
    handle = layer0.register_forward_hook(lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            sequence_logps(model, batch, batch_context=_context(model))  # the engine enters the batch context
            with disable_reft(model):
                sequence_logps(model, batch, batch_context=_context(model))
    finally:
        handle.remove()
    edited, plain = seen[0].reshape(rows * seq_len, -1), seen[1].reshape(rows * seq_len, -1)
    changed = set(torch.nonzero((edited - plain).abs().amax(1) > 1e-6).flatten().tolist())
    assert changed == expected


@pytest.mark.parametrize("positions,share", [("f1+l1", True), ("f2+l2", False), ("l3", True)])
def test_packed_and_padded_layouts_agree_with_interventions(positions, share):
    model = attach_reft(tiny_llama(), reft_args(positions=positions, share=share))
    _perturb(model)
    packed, padded = _logps(model, PAIRS, "packed"), _logps(model, PAIRS, "padded")
    assert _max_diff(packed, padded) <= 1e-5
    assert _max_diff(packed, _logps(tiny_llama(), PAIRS)) > 1e-2  # the interventions act


def test_deepcopy_keeps_its_own_interventions_and_disable_gives_base():
    model = attach_reft(tiny_llama(), reft_args())
    _perturb(model, seed=0)
    twin = copy.deepcopy(model)  # what a DPO reference "frozen copy of the policy" does
    before = _logps(twin, PAIRS)
    _perturb(model, seed=1)
    assert _max_diff(_logps(twin, PAIRS), before) == 0.0
    assert _max_diff(_logps(model, PAIRS), before) > 1e-2
    with disable_reft(model):
        assert _max_diff(_logps(model, PAIRS), _logps(tiny_llama(), PAIRS)) == 0.0


def test_gradient_checkpointing_gives_the_same_gradients():
    """Pins what reft.py relies on: forward hooks run outside the checkpointed layer forward."""
    batch = collate_pairs(PAIRS, 0, "packed")
    grads = []
    for checkpointing in (False, True):
        model = attach_reft(tiny_llama(), reft_args())
        _perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        seq = sequence_logps(model, batch, batch_context=_context(model))
        (seq.chosen_sum - seq.rejected_sum).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in get_reft(model).parameters()]))
    assert grads[0].abs().max() > 1e-4
    assert (grads[0] - grads[1]).abs().max().item() < 1e-6


# --- training, saving, loading ------------------------------------------------------------------------
def test_orpo_reft_trains_only_interventions_keeps_R_orthonormal_and_reloads_identically(tmp_path, capsys):
    model = attach_reft(tiny_llama(), reft_args(layers="0,1", rank=4))
    hidden = model.config.hidden_size
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    expected = 2 * (2 * 4 * hidden + 4)  # 2 layers x (R and W: rank x hidden, b: rank)
    print(f"\nReFT trainable parameters: {sum(trainable.values())} (expected {expected})")
    assert sum(trainable.values()) == expected
    assert all(n.startswith("preftune_reft.") for n in trainable)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("preftune_reft.")}
    R_before = {k: m.R.detach().clone() for k, m in get_reft(model).interventions.items()}
    held_before = _logps(model, HELD_OUT)

    trainer = PreferenceTrainer(model=model, args=_args(tmp_path, max_steps=12, logging_steps=100), train_pairs=TRAIN, pad_token_id=0)
    trainer.train()

    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_before.items()), "a base weight changed"
    moved = max((m.R.detach() - R_before[k]).abs().max().item() for k, m in get_reft(model).interventions.items())
    err = _orthonormality_error(model)
    held_after = _logps(model, HELD_OUT)
    margin = lambda s: (s.chosen_avg - s.rejected_avg).mean().item()  # noqa: E731
    print(f"R moved by {moved:.3g}; |R R^T - I|max {err:.2e}; held-out margin {margin(held_before):.3f} -> {margin(held_after):.3f}")
    assert moved > 1e-2  # R really trained ...
    assert err <= 1e-5  # ... and stayed orthonormal
    assert margin(held_after) > margin(held_before) + 0.01  # and learned something (the demo test measures how much)

    trainer.save_model(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert sorted(p.name for p in saved.iterdir()) == sorted([REFT_CONFIG, REFT_WEIGHTS])  # not the full model
    config = json.loads((saved / REFT_CONFIG).read_text())
    assert config["layers"] == [0, 1] and config["rank"] == 4 and config["positions"] == "f1+l1"
    assert config["share_weights"] is True and config["hidden_size"] == hidden and config["trainable_parameters"] == expected
    assert "base_model_name_or_path" in config

    reloaded = load_reft(saved, tiny_llama())
    assert not any(p.requires_grad for p in reloaded.parameters())
    # The trained model keeps the trainer's CPU linear kernel (oneDNN), whose float32 rounding can
    # differ from torch's own matmul in the last bit (it does on AVX2 CPUs): compare like with like.
    disable_linear_kernel(model)
    for layout in ("packed", "padded"):
        assert _max_diff(_logps(reloaded, HELD_OUT, layout), _logps(model.eval(), HELD_OUT, layout)) == 0.0
    with pytest.raises(PreftuneError, match="hidden size"):
        load_reft(saved, tiny_llama(hidden_size=48))


def test_dpo_with_reft_reference_is_the_base_model(tmp_path):
    model = attach_reft(tiny_llama(), reft_args(layers="1", rank=2, positions="l2"))

    def reference(policy, batch):
        with torch.no_grad(), disable_reft(policy):
            seq = sequence_logps(policy, batch, batch_context=_context(policy))
        return seq.chosen_sum, seq.rejected_sum

    trainer = PreferenceTrainer(model=model, args=_args(tmp_path, method="dpo", beta=0.1, max_steps=6), train_pairs=TRAIN,
                                reference=reference, pad_token_id=0)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    # identity initialisation: at step 1 the policy is the reference, so the DPO loss is log 2
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-4
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]


# --- generation ---------------------------------------------------------------------------------------
def test_generation_intervenes_on_the_prompt_during_prefill_only():
    model = attach_reft(tiny_llama(), reft_args(layers="0,1", positions="f1+l2"))
    _perturb(model, scale=3.0)
    model.eval()
    reft = get_reft(model)
    prompts = [[1, 17, 33, 52, 8, 71], [1, 44, 9]]
    new = 6
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = reft_generate(model, ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
        # reference: no KV cache, full forward each step, interventions at the prompt positions only
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(new):
                x = torch.tensor([seq])
                with reft.at_prompts(torch.tensor([[0, 0, len(prompt)]]), 1, len(seq)):
                    logits = model(x, use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
        assert out[0].tolist() == seq
        # intervening on generated tokens too would be a different model: it changes the logits
        with torch.no_grad(), reft.at_prompts(torch.tensor([[0, 0, len(seq) - 1]]), 1, len(seq) - 1):
            all_positions = model(torch.tensor([seq[:-1]]), use_cache=False).logits[0, -1]
        assert (all_positions - logits).abs().max() > 1e-3
        assert get_reft(model)._state is None  # nothing left active after generate
    # a left-padded batch generates what each prompt generates alone
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch_out = reft_generate(model, ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    for i, prompt in enumerate(prompts):
        alone = reft_generate(model, torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert batch_out[i, width:].tolist() == alone[0, len(prompt):].tolist()
    # a model saved by a training run has use_cache=False in its config (the Trainer sets it):
    # generation must still use the cache, or later steps would recompute the prompt without interventions
    model.config.use_cache = model.generation_config.use_cache = False
    again = reft_generate(model, torch.tensor([prompts[1]]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert again[0].tolist() == seq
    with pytest.raises(PreftuneError, match="left"):
        reft_generate(model, torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(PreftuneError, match="use_cache"):
        reft_generate(model, torch.tensor([prompts[0]]), max_new_tokens=2, use_cache=False)


# --- the demo task ----------------------------------------------------------------------------------
def _demo_pairs():
    from preftune.data import ColumnMap
    from preftune.data.formats import normalize_record
    from preftune.data.io import Record
    from preftune.data.tokenize import TokenizeSettings, tokenize_examples
    from preftune.demo import build_demo_tokenizer, demo_rows

    tokenizer = build_demo_tokenizer()
    train_rows, eval_rows = demo_rows()
    settings = TokenizeSettings(max_length=32, max_prompt_length=16)

    def tokenize(rows, offset):
        examples = [normalize_record(Record(r, f"demo row {i}"), ColumnMap(), offset + i) for i, r in enumerate(rows)]
        return tokenize_examples(tokenizer, examples, settings)[0]

    return tokenizer, tokenize(train_rows, 0), tokenize(eval_rows, 10**9)


@pytest.mark.slow
def test_orpo_reft_raises_heldout_preference_accuracy_on_the_demo(tmp_path):
    from preftune.demo import build_demo_model

    tokenizer, train, held_out = _demo_pairs()

    def accuracy(model):
        model.eval()
        seq = _logps(model, held_out)
        return (seq.chosen_sum > seq.rejected_sum).float().mean().item(), (seq.chosen_avg - seq.rejected_avg).mean().item()

    # 1. full fine-tuning, briefly: the model learns to answer, its preference is still unreliable
    model = build_demo_model(len(tokenizer), seed=0)
    settings = dict(learning_rate=3e-3, max_steps=110, logging_steps=1000, output_dir=str(tmp_path / "full"))
    PreferenceTrainer(model=model, args=_args(tmp_path, **settings), train_pairs=train, processing_class=tokenizer).train()
    acc_base, margin_base = accuracy(model)
    # 2. frozen base + ORPO on LoReFT interventions (layers 0,1, rank 4, positions f1+l1 shared)
    attach_reft(model, reft_args(layers="0,1", rank=4, positions="f1+l1"))
    base_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("preftune_reft.")}
    # a strong odds-ratio weight: the frozen base already answers, the interventions must add preference
    settings = dict(learning_rate=5e-2, max_steps=300, beta=5.0, logging_steps=1000, output_dir=str(tmp_path / "reft"))
    PreferenceTrainer(model=model, args=_args(tmp_path, **settings), train_pairs=train, processing_class=tokenizer).train()
    acc_reft, margin_reft = accuracy(model)
    print(f"\ndemo held-out preference accuracy: base {acc_base:.3f} -> ORPO+ReFT {acc_reft:.3f}; "
          f"mean margin {margin_base:.3f} -> {margin_reft:.3f}")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    assert acc_base < 0.8  # room to improve (the base alone is not the answer)
    assert acc_reft >= acc_base + 0.08
    assert margin_reft > margin_base
    assert _orthonormality_error(model) <= 1e-5
