"""The fast engine against the obvious computation.

* packed (prefix-shared, block-diagonal) layout == padded layout: per-sequence log-prob sums,
  an ORPO loss built from them, and every parameter gradient, with the packed layout on both
  attention paths: segment attention (:mod:`preftune.attention`, the default) and the dense
  ``(T, T)`` mask (the reference), which must also equal each other;
* both layouts == the plain Hugging Face forward (``log_softmax(model(ids).logits)``) of each
  sequence on its own, which also checks the fast LM-head path (Gemma 2 logit soft-capping);
* the layout itself: first-fit-decreasing packing, the rejected->chosen mask cut, position ids.

Models are tiny random configs built here (2 layers, hidden 32, vocab 101). Weights are drawn
with a larger init than the HF default so that outputs depend strongly on context: with the
default 0.02 a wrong mask changes log-probs by less than the tolerance and the equivalence
checks could not fail (``test_equivalence_checks_have_power`` guards this).
"""

from __future__ import annotations

import random

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.attention import segment_implementation
from preftune.engine import reduce_sequence_logps, sequence_logps, token_logps
from preftune.layout import PairTokens, collate_pairs, dense_segment_mask, pack_segments
from preftune.methods import Hyperparameters, get_method
from preftune.objective import Window, compute_objective

V = 101  # vocab size; ids 0 (pad), 1 (bos), 2 (eos) are special
INIT = 0.15
SUM_ATOL = 1e-5  # per-token log-probs and per-completion sums, fp32
# A sum of ~10-25 log-probs of about -5 lies around 30-130, where the fp32 spacing is 3.8e-6 to
# 7.6e-6: a different summation order (packed vs padded rows, oneDNN vs torch's matmul, which differ
# in the last bit on AVX2 CPUs) moves it by two or three spacings, so sums get a relative 1e-6
# (8 float32 ulps) on top of SUM_ATOL; per-token log-probs get SUM_ATOL alone.
NLL_RTOL = 1e-6
GRAD_RTOL = 1e-4  # parameter gradients, relative to the largest entry of the tensor


# --------------------------------------------------------------------------------------------
# data


def make_pairs(shapes, seed=0):
    """``shapes``: list of (prompt_len, chosen_len, rejected_len); random ids in [3, V)."""
    rng = random.Random(seed)
    out = []
    for i, (n_p, n_c, n_r) in enumerate(shapes):
        prompt = [1] + [rng.randrange(3, V) for _ in range(n_p - 1)]
        chosen = [rng.randrange(3, V) for _ in range(n_c)]
        rejected = [rng.randrange(3, V) for _ in range(n_r)]
        out.append(PairTokens(prompt, chosen, rejected, example_id=100 + i))
    return out


# (shapes, row_budget)
BATCHES = {
    # odd lengths, rows hold one long segment or two shorter ones
    "odd_lengths": ([(3, 5, 7), (1, 1, 2), (6, 2, 9), (2, 9, 1), (5, 3, 3)], None),
    # every completion is one token; the first rejected token is predicted from the prompt
    "single_token": ([(4, 1, 1), (1, 1, 1), (7, 1, 1), (2, 1, 1)], None),
    # prompts that fill (almost) the whole row budget of 24 tokens, next to short pairs
    "long_prompt": ([(21, 2, 1), (2, 1, 1), (20, 1, 3), (22, 1, 1), (3, 2, 2)], 24),
    # many pairs share a row
    "many_per_row": ([(2, 2, 3), (3, 1, 2), (1, 3, 1), (4, 2, 2), (2, 1, 4), (3, 3, 3)], 64),
}


# --------------------------------------------------------------------------------------------
# tiny models


def _common(**kw):
    cfg = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=INIT, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(kw)
    return cfg


def build_model(family: str, attn: str = "sdpa", seed: int = 0):
    import transformers as tf

    if family == "llama":
        config = tf.LlamaConfig(**_common())
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(**_common())
        cls = tf.Qwen2ForCausalLM
    elif family == "mistral":
        # a sliding window shorter than the sequences, so it matters (the packed layout once
        # ignored it: transformers uses a custom 4-D mask as-is, without adding the window)
        config = tf.MistralConfig(**_common(sliding_window=5))
        cls = tf.MistralForCausalLM
    elif family == "gemma2":
        # alternating sliding/full layers, attention and final-logit soft-capping
        config = tf.Gemma2Config(**_common(
            head_dim=8, query_pre_attn_scalar=8, sliding_window=5, final_logit_softcapping=2.0,
            attn_logit_softcapping=20.0,
        ))
        cls = tf.Gemma2ForCausalLM
    elif family == "phi3":
        config = tf.Phi3Config(**_common())
        cls = tf.Phi3ForCausalLM
    elif family == "mixtral":
        config = tf.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True))
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**_common(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            output_router_logits=True,
        ))
        cls = tf.Qwen2MoeForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).float()
    model.eval()  # no dropout; the engine must not depend on train/eval
    return model


# Gemma 2 has no SDPA support in transformers 5 (attention soft-capping): eager only.
MODEL_CASES = [
    pytest.param(fam, attn, id=f"{fam}-{attn}")
    for fam in ("llama", "qwen2", "mistral", "gemma2", "phi3", "mixtral", "qwen2_moe")
    for attn in ("eager", "sdpa")
    if not (fam == "gemma2" and attn == "sdpa")
]


# --------------------------------------------------------------------------------------------
# helpers

KERNELS = ("segments", "dense")  # the packed layout's attention: segment kernels, or the dense mask
TEST_QUERY_BLOCK = 3  # runs here are shorter than the CPU's 128-query blocks: cut them finer


@contextlib.contextmanager
def packed_attention(model, kernel: str):
    """Run ``model``'s attention as segment attention over its own kernel (with query blocks of
    ``TEST_QUERY_BLOCK``, so the blocked runs are what is tested), or with the dense mask."""
    from preftune import attention

    config = model.config
    base, block = config._attn_implementation, attention.CPU_QUERY_BLOCK
    if kernel == "segments":
        config._attn_implementation = segment_implementation(base)
        attention.CPU_QUERY_BLOCK = TEST_QUERY_BLOCK
    try:
        yield
    finally:
        config._attn_implementation = base
        attention.CPU_QUERY_BLOCK = block



def orpo_loss_of(seq, batch):
    window = Window(pairs=float(batch["num_pairs"]), nll_tokens=float(batch["num_nll_tokens"]))
    return compute_objective(get_method("orpo"), Hyperparameters(beta=0.25), seq, window).loss


def run_layout(model, pairs, layout, score_prompt=False, row_budget=None, chunk_size=7, per_token=False):
    """Collate ``pairs`` and run the engine; with ``per_token`` also return the per-token
    log-probs ordered by (sequence, position), which is comparable across layouts."""
    batch = collate_pairs(pairs, pad_id=0, layout=layout, score_prompt=score_prompt, row_budget=row_budget)
    logps, aux, _ = token_logps(model, batch, chunk_size=chunk_size)
    seq = reduce_sequence_logps(batch, logps, aux)
    if per_token:
        order = torch.sort(batch["score_seq"], stable=True).indices
        return batch, seq, logps.detach()[order]
    return batch, seq


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def assert_grads_close(got, want, names, rtol=GRAD_RTOL):
    assert len(got) == len(want) and len(got) > 0
    n_nonzero = 0
    for g, w, name in zip(got, want, names):
        scale = w.abs().max().item()
        err = (g - w).abs().max().item()
        assert err <= rtol * scale + 1e-9, f"{name}: max abs err {err:.3e}, grad scale {scale:.3e}"
        n_nonzero += scale > 0
    assert n_nonzero > 0, "all gradients are zero: the comparison proves nothing"


def hf_sequence_logp(model, prompt, completion):
    """Sum of log p(completion | prompt) from the plain HF forward of the unpadded sequence."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    n_p = len(prompt)
    return sum(logp[n_p - 1 + j, tok].item() for j, tok in enumerate(completion))


def hf_prompt_logp(model, prompt, completion):
    """Sum of log p(prompt[1:]) from the HF forward (the NLL's prompt part)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[j - 1, prompt[j]].item() for j in range(1, len(prompt)))


# --------------------------------------------------------------------------------------------
# packed == padded, per model family and attention implementation


@pytest.mark.parametrize("family,attn", MODEL_CASES)
def test_packed_matches_padded(family, attn):
    model = build_model(family, attn)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for bname, (shapes, row_budget) in BATCHES.items():
        pairs = make_pairs(shapes, seed=len(bname))
        for score_prompt in (False, True):
            b_pad, s_pad, t_pad = run_layout(model, pairs, "padded", score_prompt, per_token=True)
            g_pad = grads_of(model, orpo_loss_of(s_pad, b_pad))
            packed = {}
            for kernel in KERNELS:
                with packed_attention(model, kernel):
                    b_pk, s_pk, t_pk = run_layout(model, pairs, "packed", score_prompt, row_budget, per_token=True)
                    g_pk = grads_of(model, orpo_loss_of(s_pk, b_pk))
                packed[kernel] = (t_pk, g_pk)
                if bname == "many_per_row":
                    assert b_pk["input_ids"].shape[0] < len(pairs), "scenario should pack several pairs per row"
                where = f"{family}/{attn}/{kernel}/{bname}/score_prompt={score_prompt}"
                torch.testing.assert_close(
                    t_pk, t_pad, rtol=0, atol=SUM_ATOL,
                    msg=lambda m: f"{where} per-token log-probs: {m}",
                )
                for field in ("chosen_sum", "rejected_sum", "nll_sum"):
                    torch.testing.assert_close(
                        getattr(s_pk, field), getattr(s_pad, field), rtol=NLL_RTOL,
                        atol=SUM_ATOL, msg=lambda m, f=field: f"{where} {f}: {m}",
                    )
                for field in ("chosen_count", "rejected_count", "nll_count"):
                    assert torch.equal(getattr(s_pk, field), getattr(s_pad, field)), field
                # counts are what the pairs say
                assert s_pk.chosen_count.tolist() == [len(p.chosen) for p in pairs]
                assert s_pk.rejected_count.tolist() == [len(p.rejected) for p in pairs]
                assert s_pk.nll_count.tolist() == [len(p.chosen) + (len(p.prompt) - 1 if score_prompt else 0) for p in pairs]
                assert_grads_close(g_pk, g_pad, [f"{where} {n}" for n in names])
            # segment attention against the dense-mask reference on the same rows
            (t_seg, g_seg), (t_dense, g_dense) = packed["segments"], packed["dense"]
            torch.testing.assert_close(t_seg, t_dense, rtol=0, atol=SUM_ATOL)
            assert_grads_close(g_seg, g_dense, [f"{family}/{attn}/{bname} segments vs dense {n}" for n in names])


@pytest.mark.parametrize("family,attn", MODEL_CASES)
def test_engine_matches_plain_hf_forward(family, attn):
    """Both layouts against ``log_softmax(model(ids).logits)`` of each sequence on its own."""
    model = build_model(family, attn, seed=1)
    shapes, row_budget = BATCHES["odd_lengths"]
    pairs = make_pairs(shapes, seed=7)
    want_c = torch.tensor([hf_sequence_logp(model, p.prompt, p.chosen) for p in pairs], dtype=torch.float64)
    want_r = torch.tensor([hf_sequence_logp(model, p.prompt, p.rejected) for p in pairs], dtype=torch.float64)
    want_prompt = torch.tensor([hf_prompt_logp(model, p.prompt, p.chosen) for p in pairs], dtype=torch.float64)
    for layout, kernel in (("packed", "segments"), ("packed", "dense"), ("padded", "dense")):
        with torch.no_grad(), packed_attention(model, kernel):
            _, seq = run_layout(model, pairs, layout, score_prompt=True, row_budget=row_budget)
        torch.testing.assert_close(seq.chosen_sum.double(), want_c, rtol=0, atol=SUM_ATOL)
        torch.testing.assert_close(seq.rejected_sum.double(), want_r, rtol=0, atol=SUM_ATOL)
        torch.testing.assert_close(-seq.nll_sum.double(), want_c + want_prompt, rtol=NLL_RTOL, atol=SUM_ATOL)


def test_gemma2_softcap_is_on_fast_path():
    """The fast path reads ``final_logit_softcapping`` (a single pair, one unpadded row)."""
    model = build_model("gemma2", "eager")
    assert model.config.final_logit_softcapping == 2.0
    pair = make_pairs([(5, 6, 4)], seed=3)[0]
    with torch.no_grad():
        _, seq = run_layout(model, [pair], "packed")
        # without the soft-cap the answer is far off, so the comparison below can fail
        raw = torch.log_softmax(model.lm_head(model.model(torch.tensor([pair.prompt + pair.chosen])).last_hidden_state)[0], -1)
    uncapped = sum(raw[len(pair.prompt) - 1 + j, t].item() for j, t in enumerate(pair.chosen))
    want = hf_sequence_logp(model, pair.prompt, pair.chosen)
    assert abs(uncapped - want) > 0.1
    assert abs(seq.chosen_sum.item() - want) <= SUM_ATOL


# --------------------------------------------------------------------------------------------
# MoE: router aux loss


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_aux_loss(family):
    model = build_model(family, "sdpa")
    shapes, row_budget = BATCHES["many_per_row"]
    pairs = make_pairs(shapes, seed=5)
    b_pad, s_pad = run_layout(model, pairs, "padded")
    b_pk, s_pk = run_layout(model, pairs, "packed", row_budget=row_budget)
    for s in (s_pad, s_pk):
        assert s.aux_loss is not None and s.aux_loss.dim() == 0
        assert torch.isfinite(s.aux_loss) and s.aux_loss.item() > 0
        assert s.aux_loss.requires_grad
    torch.testing.assert_close(s_pk.chosen_sum, s_pad.chosen_sum, rtol=0, atol=SUM_ATOL)
    torch.testing.assert_close(s_pk.rejected_sum, s_pad.rejected_sum, rtol=0, atol=SUM_ATOL)
    # padded layout: same rows and padding mask as HF's own forward, hence the same aux loss
    with torch.no_grad():
        hf = model(input_ids=b_pad["input_ids"], attention_mask=b_pad["attention_mask"], use_cache=False)
    torch.testing.assert_close(s_pad.aux_loss.detach(), hf.aux_loss.float(), rtol=1e-5, atol=1e-6)
    # the aux loss has a gradient path to the routers
    router = dict(model.named_parameters())["model.layers.0.mlp.gate.weight"]  # the router's weight
    (g,) = torch.autograd.grad(s_pk.aux_loss, router)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    # compute_objective adds it with aux_coef
    orpo, hp = get_method("orpo"), Hyperparameters(beta=0.25)
    window = Window(pairs=float(len(pairs)), nll_tokens=float(b_pk["num_nll_tokens"]))
    with_aux = compute_objective(orpo, hp, s_pk, window, aux_coef=0.01).loss
    without = compute_objective(orpo, hp, s_pk, window, aux_coef=0.0).loss
    torch.testing.assert_close(with_aux - without, 0.01 * s_pk.aux_loss, rtol=1e-5, atol=1e-7)


def test_no_router_logits_means_no_aux_loss():
    model = build_model("llama")
    _, seq = run_layout(model, make_pairs([(2, 2, 2)]), "packed")
    assert seq.aux_loss is None


# --------------------------------------------------------------------------------------------
# PEFT LoRA and gradient checkpointing


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]], ids=["attn", "attn+lm_head"])
def test_lora_llama_packed_matches_padded(targets):
    from peft import LoraConfig, get_peft_model

    base = build_model("llama", "sdpa")
    # init_lora_weights=False: random B, so the adapters change the outputs
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    if "lm_head" in targets:
        assert any("lm_head" in n for n in names)  # the head is a LoRA module: the engine's non-Linear path
    shapes, row_budget = BATCHES["long_prompt"]
    pairs = make_pairs(shapes, seed=11)
    b_pad, s_pad = run_layout(model, pairs, "padded")
    g_pad = grads_of(model, orpo_loss_of(s_pad, b_pad))
    want = torch.tensor([hf_sequence_logp(model, p.prompt, p.chosen) for p in pairs], dtype=torch.float64)
    for kernel in KERNELS:
        with packed_attention(base, kernel):
            b_pk, s_pk = run_layout(model, pairs, "packed", row_budget=row_budget)
            g_pk = grads_of(model, orpo_loss_of(s_pk, b_pk))
        torch.testing.assert_close(s_pk.chosen_sum, s_pad.chosen_sum, rtol=0, atol=SUM_ATOL)
        torch.testing.assert_close(s_pk.rejected_sum, s_pad.rejected_sum, rtol=0, atol=SUM_ATOL)
        torch.testing.assert_close(s_pk.chosen_sum.double(), want, rtol=0, atol=SUM_ATOL)
        assert_grads_close(g_pk, g_pad, names)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_checkpointing_llama(kernel):
    """With checkpointing the backward recomputes each layer: on segment attention that recompute
    must run the same segment plan (a plain causal recompute would give wrong gradients)."""
    shapes, row_budget = BATCHES["odd_lengths"]
    pairs = make_pairs(shapes, seed=13)
    plain = build_model("llama", "sdpa", seed=3)
    plain.train()
    b_pk, s_plain = run_layout(plain, pairs, "packed", row_budget=row_budget)
    g_plain = grads_of(plain, orpo_loss_of(s_plain, b_pk))

    ckpt = build_model("llama", "sdpa", seed=3)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    assert ckpt.is_gradient_checkpointing
    names = [n for n, _ in ckpt.named_parameters()]
    b_pad, s_pad = run_layout(ckpt, pairs, "padded")
    g_pad = grads_of(ckpt, orpo_loss_of(s_pad, b_pad))
    with packed_attention(ckpt, kernel):
        _, s_pk = run_layout(ckpt, pairs, "packed", row_budget=row_budget)
        g_pk = grads_of(ckpt, orpo_loss_of(s_pk, b_pk))
    torch.testing.assert_close(s_pk.chosen_sum, s_pad.chosen_sum, rtol=0, atol=SUM_ATOL)
    torch.testing.assert_close(s_pk.rejected_sum, s_plain.rejected_sum, rtol=0, atol=SUM_ATOL)
    assert_grads_close(g_pk, g_pad, names)
    assert_grads_close(g_pk, g_plain, names)


def test_chunk_size_does_not_change_results():
    model = build_model("llama")
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=17)
    batch = collate_pairs(pairs, pad_id=0, layout="packed")
    s1 = sequence_logps(model, batch, chunk_size=1)
    s_big = sequence_logps(model, batch, chunk_size=10_000)
    torch.testing.assert_close(s1.chosen_sum, s_big.chosen_sum, rtol=0, atol=SUM_ATOL)
    torch.testing.assert_close(s1.rejected_sum, s_big.rejected_sum, rtol=0, atol=SUM_ATOL)
    names = [n for n, _ in model.named_parameters()]
    assert_grads_close(grads_of(model, orpo_loss_of(s1, batch)), grads_of(model, orpo_loss_of(s_big, batch)), names)


def _rejected_sums_with_mask(model, batch, mask):
    """Summed rejected log-probs from the plain HF forward of the packed rows under ``mask``."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False).logits
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), -1)
    per_token = logp[batch["score_index"], batch["score_target"]]
    b = int(batch["num_pairs"])
    return torch.zeros(2 * b, dtype=torch.float64).index_add(0, batch["score_seq"], per_token)[b:]


@pytest.mark.parametrize("kernel", KERNELS)
def test_equivalence_checks_have_power(kernel):
    """A packed mask that lets rejected tokens see the chosen ones, or rejected positions that
    continue after the chosen completion, must change the rejected log-probs by far more than
    the tolerance, otherwise the tests above could pass on a broken layout."""
    model = build_model("llama", "sdpa")
    pairs = make_pairs(BATCHES["odd_lengths"][0], seed=19)
    batch = collate_pairs(pairs, pad_id=0, layout="packed")
    with torch.no_grad(), packed_attention(model, kernel):
        good = sequence_logps(model, batch).rejected_sum
        shifted = dict(batch, position_ids=_naive_positions(batch))
        bad_pos = sequence_logps(model, shifted).rejected_sum
    mask = dense_segment_mask(batch)
    leaky = mask.clone()
    for r in range(leaky.shape[0]):
        seg_ids = _segment_ids(batch, r)
        same = seg_ids[:, None] == seg_ids[None, :]
        causal = torch.ones_like(same).tril_()
        leaky[r, 0] |= same & causal & (seg_ids[:, None] >= 0)
    torch.testing.assert_close(_rejected_sums_with_mask(model, batch, mask), good.double(), rtol=0, atol=SUM_ATOL)
    bad_mask = _rejected_sums_with_mask(model, batch, leaky)
    assert (bad_mask - good).abs().max() > 100 * SUM_ATOL
    assert (bad_pos - good).abs().max() > 100 * SUM_ATOL


def _segment_ids(batch, r):
    """(T,) segment index of each token of packed row ``r`` (-1 for padding), from prompt_spans."""
    t = batch["input_ids"].shape[1]
    ids = torch.full((t,), -1)
    spans = [(k, off) for k, (row, off, _) in enumerate(batch["prompt_spans"].tolist()) if row == r]
    offsets = [off for _, off in spans] + [int(batch["token_mask"][r].sum())]
    for j, (k, off) in enumerate(spans):
        ids[off : offsets[j + 1]] = k
    return ids


def _naive_positions(batch):
    pos = batch["position_ids"].clone()
    for r in range(pos.shape[0]):
        seg = _segment_ids(batch, r)
        for k in seg.unique().tolist():
            if k >= 0:
                idx = (seg == k).nonzero().squeeze(1)
                pos[r, idx] = torch.arange(len(idx))
    return pos


# --------------------------------------------------------------------------------------------
# layout: packing, mask, positions, score indices


def test_pack_segments_hand_case():
    # lengths 5, 3, 8, 2, 4 into rows of 10, decreasing order 8(i2) 5(i0) 4(i4) 3(i1) 2(i3):
    # 8 -> new row A (free 2); 5 -> new row B (free 5); 4 -> A? no, B (free 1);
    # 3 -> A? no, B? no, new row C (free 7); 2 -> A (free 0)
    assert pack_segments([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    # ties broken by index; a segment longer than the budget sits alone
    assert pack_segments([4, 4, 4], 8) == [[0, 1], [2]]
    assert pack_segments([12, 3, 2], 10) == [[0], [1, 2]]
    assert pack_segments([], 10) == []


def _reference_ffd(lengths, budget):
    """First-fit decreasing, written independently: rows as lists, loads recomputed each time."""
    rows = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        target = next((row for row in rows if sum(lengths[k] for k in row) + lengths[i] <= budget), None)
        if target is None:
            rows.append([i])
        else:
            target.append(i)
    return rows


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30), st.integers(1, 64))
def test_pack_segments_properties(lengths, budget):
    rows = pack_segments(lengths, budget)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each segment exactly once
    for row in rows:
        assert sum(lengths[i] for i in row) <= budget or len(row) == 1
    assert rows == pack_segments(list(lengths), budget)  # deterministic
    assert rows == _reference_ffd(lengths, budget)


def test_collate_packed_hand_case():
    # one pair: prompt [1, 10, 11], chosen [20, 21], rejected [30, 31, 32]
    pair = PairTokens([1, 10, 11], [20, 21], [30, 31, 32])
    b = collate_pairs([pair], pad_id=0, layout="packed", row_budget=10)
    assert b["input_ids"].tolist() == [[1, 10, 11, 20, 21, 30, 31, 32]]
    # rejected positions continue from the prompt end (3), not from the chosen end (5)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert b["segments"].tolist() == [[0, 0, 3, 2, 3]]  # (row, offset, |prompt|, |chosen|, |rejected|)
    assert "attention_mask" not in b  # no (T, T) tensor in the batch
    m = dense_segment_mask(b)[0, 0].int().tolist()
    assert m == [
        # keys: p p p c c r r r
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected: prompt and earlier rejected, never chosen
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    # scored: chosen 20 <- pos 2, 21 <- pos 3; rejected 30 <- pos 2 (last prompt token), 31 <- 5, 32 <- 6
    assert b["score_index"].tolist() == [2, 3, 2, 5, 6]
    assert b["score_target"].tolist() == [20, 21, 30, 31, 32]
    assert b["score_seq"].tolist() == [0, 0, 1, 1, 1]
    assert b["score_is_completion"].all()
    b2 = collate_pairs([pair], pad_id=0, layout="packed", score_prompt=True)
    assert b2["score_index"].tolist() == [0, 1, 2, 3, 2, 5, 6]
    assert b2["score_target"].tolist() == [10, 11, 20, 21, 30, 31, 32]
    assert b2["score_is_completion"].tolist() == [False, False, True, True, True, True, True]
    assert int(b2["num_nll_tokens"]) == 4 and int(b["num_nll_tokens"]) == 2


def test_collate_packed_mask_and_positions_general():
    shapes, row_budget = BATCHES["many_per_row"]
    pairs = make_pairs(shapes, seed=23) + make_pairs(BATCHES["long_prompt"][0], seed=29)
    b = collate_pairs(pairs, pad_id=0, layout="packed", row_budget=row_budget)
    mask = dense_segment_mask(b)[:, 0]  # (R, T, T)
    rows, t = b["input_ids"].shape
    assert rows < len(pairs)
    assert (b["token_mask"].sum(1) <= max(row_budget, max(p.packed_length for p in pairs))).all()
    seen = set()
    for k, (r, off, n_p) in enumerate(b["prompt_spans"].tolist()):
        # prompt_spans follow row order; find the pair by its tokens
        matches = [i for i, p in enumerate(pairs) if i not in seen
                   and b["input_ids"][r, off : off + p.packed_length].tolist() == p.prompt + p.chosen + p.rejected]
        assert matches, "segment tokens not found where prompt_spans says"
        i = matches[0]
        seen.add(i)
        p = pairs[i]
        n_c, n_r = len(p.chosen), len(p.rejected)
        assert n_p == len(p.prompt)
        c = slice(off + n_p, off + n_p + n_c)
        rj = slice(off + n_p + n_c, off + n_p + n_c + n_r)
        seg = slice(off, off + p.packed_length)
        assert not mask[r, rj, c].any(), "rejected must not attend to chosen"
        assert mask[r, rj, off : off + n_p].all(), "rejected attends to the whole prompt"
        assert torch.equal(mask[r, rj, rj], torch.ones(n_r, n_r, dtype=torch.bool).tril())
        assert torch.equal(mask[r, c, off : off + n_p + n_c], torch.ones(n_c, n_p + n_c, dtype=torch.bool).tril(n_p))
        # nothing outside the segment is visible from inside it
        outside = torch.ones(t, dtype=torch.bool)
        outside[seg] = False
        assert not mask[r, seg][:, outside].any()
        assert b["position_ids"][r, rj].tolist() == list(range(n_p, n_p + n_r))
        assert b["position_ids"][r, seg.start : c.stop].tolist() == list(range(n_p + n_c))
        # score positions: the token after each predictor, except the first rejected token
        flat = b["input_ids"].reshape(-1)
        sel = b["score_seq"] == len(pairs) + i
        idx, tgt = b["score_index"][sel], b["score_target"][sel]
        assert tgt.tolist() == p.rejected
        assert idx[0].item() == r * t + off + n_p - 1
        assert torch.equal(flat[idx[1:] + 1], tgt[1:])
        sel_c = b["score_seq"] == i
        assert torch.equal(flat[b["score_index"][sel_c] + 1], b["score_target"][sel_c])
    assert seen == set(range(len(pairs)))
    # padding queries see only themselves (no empty softmax rows), real queries never see padding
    for r in range(rows):
        n_real = int(b["token_mask"][r].sum())
        for q in range(n_real, t):
            assert mask[r, q].nonzero().squeeze(1).tolist() == [q]
        assert not mask[r, :n_real, n_real:].any()
        assert mask[r].any(-1).all()


def test_collate_padded_hand_case():
    pairs = [PairTokens([1, 10], [20], [30, 31]), PairTokens([1], [21, 22, 23], [32])]
    b = collate_pairs(pairs, pad_id=0, layout="padded")
    assert b["input_ids"].tolist() == [[1, 10, 20, 0], [1, 21, 22, 23], [1, 10, 30, 31], [1, 32, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    # row length 4: pair 0 chosen in row 0, pair 1 chosen in row 1, rejected in rows 2 and 3;
    # token k of a completion is predicted from flat position row * 4 + len(prompt) - 1 + k
    assert b["score_index"].tolist() == [1, 9, 10, 4, 5, 6, 12]
    assert b["score_target"].tolist() == [20, 30, 31, 21, 22, 23, 32]
    assert b["score_seq"].tolist() == [0, 2, 2, 1, 1, 1, 3]


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError):
        collate_pairs([], pad_id=0)
    with pytest.raises(ValueError):
        collate_pairs([PairTokens([1], [2], [3])], pad_id=0, layout="diagonal")
    with pytest.raises(ValueError):
        PairTokens([], [2], [3])
    with pytest.raises(ValueError):
        PairTokens([1], [], [3])


def test_cost_model_row_budget_keeps_equivalence():
    """Rows chosen by the padding-vs-attention cost model still equal the padded reference."""
    from preftune.layout import attention_cost_for, choose_row_budget

    from conftest import tiny_llama

    model = tiny_llama(vocab_size=97, seed=4)
    g = torch.Generator().manual_seed(5)
    r = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    pairs = [PairTokens(r(n_p), r(n_c), r(n_r), i) for i, (n_p, n_c, n_r) in enumerate([(9, 3, 5), (2, 1, 1), (14, 6, 2), (5, 5, 5), (1, 2, 7)])]
    lengths = [p.packed_length for p in pairs]
    cheap_attention = choose_row_budget(lengths, 1e-6)
    costly_attention = choose_row_budget(lengths, 10.0)
    assert cheap_attention == sum(lengths)  # one row: no padding at all
    assert costly_attention == max(lengths)  # attention dominates: short rows
    cost = attention_cost_for(model.config)
    assert 0 < cost < 1
    # segment attention computes nothing across segments: one row, no padding
    with packed_attention(model, "segments"):
        assert attention_cost_for(model.config) == 0.0
    assert choose_row_budget(lengths, 0.0) == sum(lengths)
    padded = sequence_logps(model, collate_pairs(pairs, 0, "padded"))
    rows = {}
    for attention_cost in (1e-6, cost, 10.0):
        packed_batch = collate_pairs(pairs, 0, "packed", attention_cost=attention_cost)
        rows[attention_cost] = packed_batch["input_ids"].shape[0]
        packed = sequence_logps(model, packed_batch)
        assert torch.allclose(packed.chosen_sum, padded.chosen_sum, atol=1e-5)
        assert torch.allclose(packed.rejected_sum, padded.rejected_sum, atol=1e-5)
    assert rows[1e-6] == 1 and rows[10.0] > 1  # the collator really used the cost model: one row vs several
