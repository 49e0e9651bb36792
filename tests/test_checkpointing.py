"""Selective activation checkpointing (``preftune.checkpointing``): same numbers, less kept.

Every model family of the engine's fast path, in training mode, packed on segment attention:
the ORPO loss, the per-token log-probs and every parameter gradient with selective
checkpointing must equal the plain run's bit for bit (the replay runs the same operations on
the same inputs), with LoRA adapters and with every weight training. And it must keep less:
the bytes of tensors still alive between forward and backward (what autograd holds) are
counted directly.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preftune.checkpointing import MIN_SAVED_CONTRACTION, enable_selective_checkpointing, selective_policy
from test_engine_equivalence import BATCHES, build_model, grads_of, make_pairs, orpo_loss_of, packed_attention, run_layout
from test_engine_families import FAMILIES, build

IN_DEPTH = ("llama", "qwen2", "mistral", "gemma2", "phi3", "mixtral", "qwen2_moe")


def make(family: str):
    if family in IN_DEPTH:
        return build_model(family, attn="eager" if family == "gemma2" else "sdpa")
    return build(family)


def loss_and_grads(model, pairs):
    torch.manual_seed(1)  # the same dropout masks in both runs (GPT-2 keeps dropout on)
    with packed_attention(model, "segments"):
        batch, seq, per_token = run_layout(model, pairs, "packed", score_prompt=True, per_token=True)
        loss = orpo_loss_of(seq, batch)
        return loss.detach(), per_token, grads_of(model, loss)


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    # random B as well as A (peft's default B = 0 would leave every A gradient zero)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", bias="none",
                                            init_lora_weights=False))


def assert_same(plain, selective, what):
    (l0, t0, g0), (l1, t1, g1) = plain, selective
    assert torch.equal(l0, l1), f"{what}: loss {l0.item()!r} vs {l1.item()!r}"
    assert torch.equal(t0, t1), f"{what}: per-token log-probs differ"
    assert len(g0) == len(g1) and len(g0) > 0
    moved = 0
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert torch.equal(a, b), f"{what}: gradient {i} differs by {(a - b).abs().max().item():.3e}"
        moved += int(a.abs().max() > 0)
    assert moved > len(g0) // 2, f"{what}: most gradients are zero; the comparison proves little"


@pytest.mark.parametrize("family", IN_DEPTH + tuple(sorted(FAMILIES)))
def test_selective_checkpointing_changes_no_number(family):
    """Training mode: GPT-2's default config has dropout 0.1, replayed with the same masks."""
    model = make(family).train()
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=5)
    plain = loss_and_grads(model, pairs)
    assert enable_selective_checkpointing(model)
    assert_same(plain, loss_and_grads(model, pairs), f"{family}, every weight training")


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gemma2"])
def test_selective_checkpointing_with_lora(family):
    model = with_lora(make(family)).train()
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=7)
    plain = loss_and_grads(model, pairs)
    assert enable_selective_checkpointing(model)
    selective = loss_and_grads(model, pairs)
    assert_same(plain, selective, f"{family} + LoRA")


class _Created(TorchDispatchMode):
    """Remembers (weakly) the storage of every tensor an operation creates while ``recording``.
    It stays active through the backward too: selective checkpointing's replay must see the same
    dispatch modes as the forward it replays."""

    def __init__(self):
        super().__init__()
        self.storages = []
        self.recording = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.recording:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel():
                    self.storages.append(weakref.ref(t.untyped_storage()))
        return out


def bytes_kept_for_backward(model, pairs) -> int:
    """Bytes of the storages created during the forward that are still alive after it, weights
    excluded: what autograd keeps for the backward (the loss and log-probs are a few bytes)."""
    created = _Created()
    with packed_attention(model, "segments"), created:
        batch, seq = run_layout(model, pairs, "packed", score_prompt=True)
        loss = orpo_loss_of(seq, batch)
        created.recording = False
        del batch, seq
        gc.collect()
        # views of the weights (a transposed weight in a matmul) point at the weights' storage
        seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        total = 0
        for ref in created.storages:
            s = ref()
            if s is not None and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        loss.backward()
    return total


def test_selective_checkpointing_keeps_less():
    """A Llama with a SwiGLU MLP 4x wider than the model, LoRA on every projection (the user's
    case): the plain run keeps four ``(T, intermediate)`` tensors per layer, the selective run two
    plus projection outputs; it must keep at most 70% of the plain run's bytes."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = with_lora(tf.LlamaForCausalLM(config)).train()
    pairs = make_pairs([(40, 30, 25), (35, 20, 45)], seed=9)
    plain = bytes_kept_for_backward(model, pairs)
    enable_selective_checkpointing(model)
    selective = bytes_kept_for_backward(model, pairs)
    assert plain > 0 and selective <= 0.7 * plain, (plain, selective)


def test_policy_keeps_long_contractions_only():
    from torch.utils.checkpoint import CheckpointPolicy

    a, w_long, w_short = torch.zeros(3, MIN_SAVED_CONTRACTION), torch.zeros(MIN_SAVED_CONTRACTION, 5), torch.zeros(8, 5)
    aten = torch.ops.aten
    assert selective_policy(None, aten.mm.default, a, w_long) == CheckpointPolicy.MUST_SAVE
    assert selective_policy(None, aten.mm.default, torch.zeros(3, 8), w_short) == CheckpointPolicy.PREFER_RECOMPUTE  # LoRA B
    assert selective_policy(None, aten.addmm.default, torch.zeros(5), a, w_long) == CheckpointPolicy.MUST_SAVE
    assert selective_policy(None, aten.silu.default, a) == CheckpointPolicy.PREFER_RECOMPUTE
    assert selective_policy(None, aten.mul.Tensor, a, a) == CheckpointPolicy.PREFER_RECOMPUTE
    assert selective_policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == CheckpointPolicy.MUST_SAVE


@pytest.mark.parametrize("bf16", ["false", "true"])
def test_trainer_step_is_the_same_with_and_without(tmp_path, bf16):
    """Two optimizer steps through PreferenceTrainer with ``selective_checkpointing=True`` (off by
    default): the weights after them equal the plain run's bit for bit, in fp32 and under bf16
    autocast (the replay re-enters the forward's autocast)."""
    from test_trainer import random_pairs, train_weights

    pairs = random_pairs(8, seed=4)
    common = dict(max_steps=2, per_device_train_batch_size=4, bf16=bf16)
    plain, t0 = train_weights(tmp_path / "plain", pairs, **common)
    selective, t1 = train_weights(tmp_path / "selective", pairs, selective_checkpointing=True, **common)
    assert t1.args.selective_checkpointing and not t0.args.selective_checkpointing
    layers = [m for m in t1.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert layers and all(m.gradient_checkpointing for m in layers)  # it really ran checkpointed
    assert not any(getattr(m, "gradient_checkpointing", False) for m in t0.model.modules())
    from conftest import tiny_llama

    initial = dict(tiny_llama(seed=3).named_parameters())  # train_weights' starting model
    moved = 0
    for name, w in plain.items():
        assert torch.equal(w, selective[name]), name
        moved += int(not torch.equal(w, initial[name]))
    assert moved > len(plain) // 2  # the steps changed most weights: the comparison is not of two idle models
