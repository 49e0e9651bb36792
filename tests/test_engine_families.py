"""Segment attention on every model family the engine's fast LM-head path supports.

``test_engine_equivalence.py`` covers Llama, Qwen2, Mistral, Gemma 2, Phi-3, Mixtral and
Qwen2-MoE in depth (eager and SDPA, four batch shapes, LoRA, gradient checkpointing). Here every
other model type of ``engine.PLAIN_HEAD_MODEL_TYPES`` gets one batch of odd lengths with
prompt tokens scored, packed on segment attention and on the dense-mask reference, against the
padded layout: per-token log-probs to 1e-5 and every parameter gradient to 1e-4 relative.

A segment kernel that did not receive its plan would call the base kernel with the empty
``(R, 1, 0, 0)`` placeholder mask and fail on its shape, so a pass means the plan reached every
layer. StableLM's decoder layers drop keyword arguments on the way to attention: it is listed in
``attention.NO_PLAN_MODEL_TYPES`` and runs the packed layout on the dense mask, checked here too.
"""

from __future__ import annotations

import pytest
import torch

from preftune.attention import NO_PLAN_MODEL_TYPES, uses_segment_attention
from test_engine_equivalence import (
    BATCHES, INIT, KERNELS, SUM_ATOL, V, _common, assert_grads_close, grads_of, make_pairs, orpo_loss_of, packed_attention,
    run_layout,
)

# model type -> config overrides for a tiny model (2 layers, hidden 32, 4 query / 2 key-value heads)
FAMILIES = {
    "qwen3": {}, "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {"head_dim": 8}, "gemma3_text": {"head_dim": 8, "sliding_window": 5, "query_pre_attn_scalar": 8},
    "cohere": {}, "cohere2": {"sliding_window": 5}, "granite": {}, "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmo": {}, "olmo2": {}, "starcoder2": {"sliding_window": 5}, "smollm3": {}, "glm": {}, "helium": {"head_dim": 8},
    "phi": {"num_key_value_heads": 4}, "gpt_neox": {"num_key_value_heads": 4}, "stablelm": {"num_key_value_heads": 4},
    "gpt2": None,  # its own config names, below
}


def build(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = FAMILIES[model_type]
    if overrides is None:
        config = AutoConfig.for_model("gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=INIT,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        config = AutoConfig.for_model(model_type, **_common(**overrides))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def test_families_cover_the_fast_path():
    """Every model type of the fast LM-head path is tested here or in test_engine_equivalence."""
    from preftune import engine

    in_depth = {"llama", "qwen2", "mistral", "gemma2", "phi3", "mixtral", "qwen2_moe"}
    assert set(FAMILIES) | in_depth == set(engine.PLAIN_HEAD_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_packed_matches_padded(model_type):
    model = build(model_type)
    assert model.config.model_type == model_type
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=3)
    b_pad, s_pad, t_pad = run_layout(model, pairs, "padded", score_prompt=True, per_token=True)
    g_pad = grads_of(model, orpo_loss_of(s_pad, b_pad))
    for kernel in KERNELS:
        with packed_attention(model, kernel):
            if kernel == "segments":
                assert uses_segment_attention(model.config) is (model_type not in NO_PLAN_MODEL_TYPES)
            b_pk, s_pk, t_pk = run_layout(model, pairs, "packed", score_prompt=True, per_token=True)
            g_pk = grads_of(model, orpo_loss_of(s_pk, b_pk))
        where = f"{model_type}/{kernel}"
        torch.testing.assert_close(t_pk, t_pad, rtol=0, atol=SUM_ATOL, msg=lambda m: f"{where} per-token log-probs: {m}")
        assert_grads_close(g_pk, g_pad, [f"{where} {n}" for n in names])
