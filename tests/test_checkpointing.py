"""Selective activation checkpointing (``preftune.checkpointing``): same numbers, less kept.

Every model family of the engine's fast path, in training mode, packed on segment attention:
the ORPO loss, the per-token log-probs and every parameter gradient with selective
checkpointing must equal the plain run's bit for bit (the replay runs the same operations on
the same inputs), with LoRA adapters and with every weight training. And it must keep less:
the bytes of tensors still alive between forward and backward (what autograd holds) are
counted directly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _census import saved_tensor_census
from preftune.checkpointing import (
    MIN_SAVED_CONTRACTION, disable_feed_forward_checkpointing, enable_feed_forward_checkpointing, enable_selective_checkpointing,
    selective_policy,
)
from test_engine_equivalence import BATCHES, build_model, grads_of, make_pairs, orpo_loss_of, packed_attention, run_layout
from test_engine_families import FAMILIES, build

IN_DEPTH = ("llama", "qwen2", "mistral", "gemma2", "phi3", "mixtral", "qwen2_moe")
# --selective_checkpointing true (every decoder layer) and mlp (the feed-forward blocks only)
ENABLE = {"layers": enable_selective_checkpointing, "mlp": enable_feed_forward_checkpointing}


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


@pytest.mark.parametrize("mode", sorted(ENABLE))
@pytest.mark.parametrize("family", IN_DEPTH + tuple(sorted(FAMILIES)))
def test_selective_checkpointing_changes_no_number(family, mode):
    """Training mode: GPT-2's default config has dropout 0.1, replayed with the same masks."""
    model = make(family).train()
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=5)
    plain = loss_and_grads(model, pairs)
    assert ENABLE[mode](model)
    assert_same(plain, loss_and_grads(model, pairs), f"{family}, {mode}, every weight training")


@pytest.mark.parametrize("mode", sorted(ENABLE))
@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gemma2"])
def test_selective_checkpointing_with_lora(family, mode):
    model = with_lora(make(family)).train()
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=7)
    plain = loss_and_grads(model, pairs)
    assert ENABLE[mode](model)
    selective = loss_and_grads(model, pairs)
    assert_same(plain, selective, f"{family} + LoRA, {mode}")


def test_feed_forward_checkpointing_wraps_each_block_once_and_undoes():
    """Every decoder layer's MLP is wrapped (granitemoe's ``block_sparse_moe`` too), enabling
    twice wraps nothing twice, a deep copy runs its own blocks, evaluation and generation run the
    class's forward untouched, and disabling restores the class's forward."""
    import copy

    from test_engine_families import build

    model = build("granitemoe")
    blocks = [layer.block_sparse_moe for layer in model.model.layers]
    assert enable_feed_forward_checkpointing(model) == len(blocks) == enable_feed_forward_checkpointing(model)
    assert all("forward" in vars(b) for b in blocks)
    twin = copy.deepcopy(model)
    assert all(tb.forward.__self__ is tb for tb in (layer.block_sparse_moe for layer in twin.model.layers))
    ids = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    with torch.no_grad():
        wrapped = model(ids).logits
        disable_feed_forward_checkpointing(model)
        assert not any("forward" in vars(b) for b in blocks)
        assert torch.equal(wrapped, model(ids).logits)


def bytes_kept_for_backward(model, pairs) -> int:
    """Bytes of the storages created during the forward that are still alive after it, weights
    excluded: what autograd keeps for the backward (the loss and log-probs are a few bytes)."""
    def forward():
        batch, seq = run_layout(model, pairs, "packed", score_prompt=True)
        return orpo_loss_of(seq, batch)

    with packed_attention(model, "segments"):
        return sum(saved_tensor_census(model, forward, lambda loss: loss.backward()).values())


def test_selective_checkpointing_keeps_less():
    """A Llama with a SwiGLU MLP 4x wider than the model, LoRA on every projection (the user's
    case): the plain run keeps four ``(T, intermediate)`` tensors per layer, the selective runs two
    plus projection outputs. Checkpointing the MLPs alone must keep two ``(T, intermediate)`` float32
    tensors per layer fewer than the plain run, less what it keeps instead (``down``'s base output,
    ``(T, hidden)``, and three LoRA ``A`` outputs, ``(T, r)``); every layer, at most 70% of the plain
    run's bytes and less than the MLPs alone."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = with_lora(tf.LlamaForCausalLM(config)).train()
    lengths = [(40, 30, 25), (35, 20, 45)]
    pairs = make_pairs(lengths, seed=9)
    per_token_and_layer = 2 * config.intermediate_size - config.hidden_size - 3 * 4  # floats; LoRA r = 4
    fewer_at_least = sum(map(sum, lengths)) * config.num_hidden_layers * per_token_and_layer * 4  # bytes
    plain = bytes_kept_for_backward(model, pairs)
    enable_feed_forward_checkpointing(model)
    mlp = bytes_kept_for_backward(model, pairs)
    disable_feed_forward_checkpointing(model)
    enable_selective_checkpointing(model)
    layers = bytes_kept_for_backward(model, pairs)
    assert plain - mlp >= fewer_at_least, (plain, mlp, fewer_at_least)
    assert layers <= 0.7 * plain and layers < mlp, (plain, mlp, layers)


def test_gated_mlp_probe_rejects_other_maths_and_keeps_the_random_state():
    """An MLP whose forward adds a dropout to the gated product is not the gated shape: it gets the
    generic selective checkpoint (which replays the dropout mask), and the values and gradients
    still match; the probe does not move the caller's random stream."""
    import transformers as tf

    class DroppingMLP(tf.models.llama.modeling_llama.LlamaMLP):
        def forward(self, x):
            return self.down_proj(F.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x), 0.3, self.training))

    config = tf.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).train()
    for layer in model.model.layers:
        state = layer.mlp.state_dict()
        layer.mlp = DroppingMLP(config)
        layer.mlp.load_state_dict(state)
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=3)
    plain = loss_and_grads(model, pairs)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    assert enable_feed_forward_checkpointing(model) == 2
    assert torch.equal(before, torch.get_rng_state())
    assert all(layer.mlp.forward.__func__.__name__ == "_selectively_checkpointed_forward" for layer in model.model.layers)
    assert_same(plain, loss_and_grads(model, pairs), "Llama with dropout in the MLP")


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


@pytest.mark.parametrize("mode", ["mlp", "true"])
@pytest.mark.parametrize("bf16", ["false", "true"])
def test_trainer_step_is_the_same_with_and_without(tmp_path, bf16, mode):
    """Two optimizer steps through PreferenceTrainer with ``selective_checkpointing`` ``mlp`` (the
    default) or ``true`` against ``false``: the weights after them equal the plain run's bit for
    bit, in fp32 and under bf16 autocast (the recomputations re-enter the forward's autocast)."""
    from test_trainer import random_pairs, train_weights

    from preftune.checkpointing import _feed_forward_blocks

    pairs = random_pairs(8, seed=4)
    common = dict(max_steps=2, per_device_train_batch_size=4, bf16=bf16)
    plain, t0 = train_weights(tmp_path / "plain", pairs, selective_checkpointing="false", **common)
    selective, t1 = train_weights(tmp_path / "selective", pairs, selective_checkpointing=mode, **common)
    assert t1.args.selective_checkpointing == mode and t0.args.selective_checkpointing == "false"
    layers = [m for m in t1.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    mlps = list(_feed_forward_blocks(t1.model))
    assert layers and len(mlps) == len(layers)
    if mode == "true":  # it really ran checkpointed
        assert all(m.gradient_checkpointing for m in layers)
    else:
        assert all(m.forward.__func__.__name__ == "_gated_mlp_forward" for m in mlps)
    plain_layers = [m for m in t0.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert not any(m.gradient_checkpointing for m in plain_layers)
    assert not any("forward" in vars(m) for m in _feed_forward_blocks(t0.model))
    from conftest import tiny_llama

    initial = dict(tiny_llama(seed=3).named_parameters())  # train_weights' starting model
    moved = 0
    for name, w in plain.items():
        assert torch.equal(w, selective[name]), name
        moved += int(not torch.equal(w, initial[name]))
    assert moved > len(plain) // 2  # the steps changed most weights: the comparison is not of two idle models


def test_selective_checkpointing_setting_parses_and_refuses(tmp_path):
    """YAML/Python booleans and any case map to false|mlp|true; anything else stops with the choices."""
    from preftune.config import PreftuneConfig
    from preftune.errors import PreftuneError

    def setting(value):
        return PreftuneConfig(output_dir=str(tmp_path / "o"), selective_checkpointing=value, use_cpu=True).selective_checkpointing

    assert PreftuneConfig(output_dir=str(tmp_path / "o"), use_cpu=True).selective_checkpointing == "mlp"
    assert [setting(v) for v in (True, False, "MLP", " true ")] == ["true", "false", "mlp", "true"]
    with pytest.raises(PreftuneError, match="must be false, mlp or true, got 'layers'"):
        setting("layers")
