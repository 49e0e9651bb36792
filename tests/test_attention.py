"""Segment attention (:mod:`preftune.attention`) piece by piece.

The model-level equivalence (log-probs and every gradient, every family, against the dense-mask
reference and the padded layout) is in ``test_engine_equivalence.py``. Here: the plan (its query
runs and masks against the dense reference mask, its varlen description run by an independent
executor, the attention work it counts), the kernels' dropout, the fallback to the base kernel
when a call carries no plan, and the GPU kernels (which skip here: no CUDA on this machine).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.attention import (
    SEGMENT_KWARG, SegmentPlan, flash_attn_available, prepared_mask_placeholder, register_segment_attention,
    segment_implementation, uses_segment_attention,
)
from preftune.layout import PairTokens, collate_pairs, dense_segment_mask

register_segment_attention()


def _segments_batch(shapes, row_budget=None):
    pairs = [PairTokens([1] * p, [5] * c, [6] * r, i) for i, (p, c, r) in enumerate(shapes)]
    return collate_pairs(pairs, pad_id=0, layout="packed", row_budget=row_budget)


def _plan(batch):
    rows, t = batch["input_ids"].shape
    return SegmentPlan.from_segments(batch["segments"], rows, t)


def _dense_with_window(batch, window):
    """The reference mask, cut to a sliding window by position-id distance (as transformers does)."""
    mask = dense_segment_mask(batch)[:, 0]
    if window is not None:
        pos = batch["position_ids"]
        mask &= pos[:, None, :] > pos[:, :, None] - window
    return mask


def test_plan_runs_hand_case():
    # row 0: pair 0 (3, 2, 3) at 0..7 and pair 1 (2, 1, 1) at 8..11; row 1: pair 2 (4, 1, 2) + padding
    batch = _segments_batch([(3, 2, 3), (2, 1, 1), (4, 1, 2)], row_budget=12)
    assert batch["segments"].tolist() == [[0, 0, 3, 2, 3], [0, 8, 2, 1, 1], [1, 0, 4, 1, 2]]
    plan = _plan(batch)
    got = [(u.row, u.q_start, u.q_len, u.keys) for u in plan.runs]
    assert got == [
        (0, 0, 5, ((0, 5),)),  # [prompt, chosen] over itself
        (0, 5, 3, ((0, 3), (5, 8))),  # rejected over [prompt, rejected]
        (0, 8, 3, ((8, 11),)),
        (0, 11, 1, ((8, 10), (11, 12))),
        (1, 0, 5, ((0, 5),)),
        (1, 5, 2, ((0, 4), (5, 7))),
    ]
    # (3, 2, 3): A sees 1+2+3+4+5 = 15 pairs, B's three queries see 4, 5, 6 keys = 15
    single = _plan(_segments_batch([(3, 2, 3)]))
    assert single.attended_pairs() == 30
    # window 2: every query sees at most its key and the one before: 1 + 2*4 (A) + 2*3 (B)
    assert single.attended_pairs(window=2) == 15


def test_query_blocks_hand_case():
    # (3, 2, 3) with blocks of 2: A's queries 0-1 see keys 0-1, 2-3 see 0-3, 4 sees 0-4;
    # B's first two queries see the prompt and rejected 0-1, the third all six keys
    plan = _plan(_segments_batch([(3, 2, 3)]))
    got = [(u.q_start, u.q_len, u.keys) for u in plan.blocks(2)]
    assert got == [(0, 2, ((0, 2),)), (2, 2, ((0, 4),)), (4, 1, ((0, 5),)), (5, 2, ((0, 3), (5, 7))), (7, 1, ((0, 3), (5, 8)))]
    assert plan.blocks(None) is plan.runs
    # runs with more keys than uncut_above stay whole: A has 5 keys, B 6
    assert [(u.q_start, u.q_len) for u in plan.blocks(2, uncut_above=5)] == [(0, 2), (2, 2), (4, 1), (5, 3)]
    assert plan.blocks(2, uncut_above=4) == plan.runs


def test_run_mask_hand_case():
    plan = _plan(_segments_batch([(3, 2, 3)]))
    run_a, run_b = plan.runs
    assert plan.run_mask(run_a, None) is None  # square and causal: SDPA's is_causal
    assert plan.run_mask(run_b, None).int().tolist() == [
        # keys: p p p r r r
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert plan.run_mask(run_b, 2).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert plan.run_mask(run_a, 2).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1],
    ]
    assert plan.run_mask(run_a, 5) is None  # a window as long as the run cuts nothing


_shapes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5)


@settings(max_examples=80, deadline=None)
@given(_shapes, st.sampled_from([None, 1, 3, 7]), st.integers(0, 30), st.sampled_from([None, 1, 2, 5]))
def test_runs_are_the_dense_mask(shapes, window, extra_budget, block):
    """Every run's mask (runs cut into query blocks or not) equals the reference mask restricted
    to its queries and keys; runs cover every real query once; no key outside a run's ranges is
    visible in the reference."""
    batch = _segments_batch(shapes, row_budget=max(sum(shapes[0]), 1) + extra_budget)
    plan = _plan(batch)
    dense = _dense_with_window(batch, window)
    covered = torch.zeros_like(batch["token_mask"])
    useful = 0
    runs = plan.blocks(block)
    if block:
        assert all(u.q_len <= block for u in runs)
    for u in runs:
        q = slice(u.q_start, u.q_start + u.q_len)
        keys = torch.cat([torch.arange(a, b) for a, b in u.keys])
        want = dense[u.row, q][:, keys]
        mask = plan.run_mask(u, window)
        got = torch.ones(u.q_len, u.k_len, dtype=torch.bool).tril_() if mask is None else mask
        assert torch.equal(got, want)
        others = torch.ones(dense.shape[-1], dtype=torch.bool)
        others[keys] = False
        assert not dense[u.row, q][:, others].any()
        assert not covered[u.row, q].any()
        covered[u.row, q] = True
        useful += int(want.sum())
    assert torch.equal(covered, batch["token_mask"])
    assert plan.attended_pairs(window) == useful


def _varlen_reference(q, k, v, meta, window):
    """An independent executor of the varlen description, float64: sequence i's queries are
    ``q[cu_q[i]:cu_q[i+1]]``, its keys ``k[kv_index[cu_k[i]:cu_k[i+1]]]``, causal aligned
    bottom-right, optionally within ``window``. Shapes ``(N, H, D)``."""
    out = torch.zeros_like(q)
    cu_q, cu_k = meta["cu_seqlens_q"].tolist(), meta["cu_seqlens_k"].tolist()
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]]
        idx = meta["kv_index"][cu_k[i] : cu_k[i + 1]]
        ks, vs = k[idx], v[idx]
        n_q, n_k = len(qs), len(ks)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(q.shape[-1])
        qi = torch.arange(n_q)[:, None] + (n_k - n_q)
        kj = torch.arange(n_k)[None, :]
        allowed = kj <= qi
        if window is not None:
            allowed &= kj > qi - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[cu_q[i] : cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_varlen_description_matches_dense_attention(window):
    """The flash path's only logic is the varlen description; run it without a GPU."""
    batch = _segments_batch([(5, 3, 4), (2, 1, 1), (7, 2, 3), (1, 4, 2)], row_budget=20)
    plan = _plan(batch)
    meta = plan.varlen()
    rows, t = batch["input_ids"].shape
    assert meta["cu_seqlens_q"][-1] == rows * t  # every token, padding included, is a query once
    assert meta["cu_seqlens_q"].dtype == torch.int32 and meta["cu_seqlens_k"].dtype == torch.int32
    g = torch.Generator().manual_seed(0)
    heads, dim = 2, 4
    q, k, v = (torch.randn(rows * t, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    got = _varlen_reference(q, k, v, meta, window).reshape(rows, t, heads, dim)
    dense = _dense_with_window(batch, window)  # (R, T, T)
    qr, kr, vr = (x.reshape(rows, t, heads, dim) for x in (q, k, v))
    scores = torch.einsum("rqhd,rkhd->rhqk", qr, kr) / math.sqrt(dim)
    scores = scores.masked_fill(~dense[:, None], float("-inf"))
    want = torch.einsum("rhqk,rkhd->rqhd", scores.softmax(-1), vr)
    real = batch["token_mask"]
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-12)


def _attention_inputs(seed=0, heads=4, kv_heads=2, t=12, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, t, dim, generator=g, dtype=dtype)
    k = torch.randn(1, kv_heads, t, dim, generator=g, dtype=dtype)
    v = torch.randn(1, kv_heads, t, dim, generator=g, dtype=dtype)
    return q, k, v


class _Module(torch.nn.Module):
    """Stands for an attention module: the kernels read only ``training``."""


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["sdpa", "softcap-maths"])
def test_dropout_is_applied_and_unbiased(softcap):
    """With dropout p the output is random, and its mean over many draws is the dropout-free
    output (dropout scales kept weights by 1/(1-p))."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[segment_implementation("sdpa")]
    batch = _segments_batch([(4, 3, 5)])
    plan = _plan(batch)
    q, k, v = _attention_inputs(t=12)
    module = _Module().train()
    kw = dict(scaling=8**-0.5, softcap=softcap, **{SEGMENT_KWARG: plan})
    clean, _ = fn(module, q, k, v, None, dropout=0.0, **kw)
    torch.manual_seed(0)
    a, _ = fn(module, q, k, v, None, dropout=0.3, **kw)
    b, _ = fn(module, q, k, v, None, dropout=0.3, **kw)
    assert (a - b).abs().max() > 1e-3 and (a - clean).abs().max() > 1e-3
    draws = 400
    mean = sum(fn(module, q, k, v, None, dropout=0.3, **kw)[0] for _ in range(draws)) / draws
    # the error of a mean of n draws shrinks like 1/sqrt(n) = 0.05 of one draw's: a biased
    # kernel (e.g. dropout without the 1/(1-p) rescaling) stays near one draw's error
    one_draw = (a - clean).abs().mean()
    assert (mean - clean).abs().mean() < 0.15 * one_draw


def test_unsupported_attention_arguments_are_refused():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[segment_implementation("sdpa")]
    q, k, v = _attention_inputs(t=12)
    plan = _plan(_segments_batch([(4, 3, 5)]))
    with pytest.raises(NotImplementedError, match="s_aux"):
        fn(_Module(), q, k, v, None, s_aux=torch.zeros(4), **{SEGMENT_KWARG: plan})
    with pytest.raises(ValueError, match="segment attention runs over"):
        segment_implementation("flex_attention")


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_without_a_plan_the_model_is_its_base(base):
    """Outside the engine (a plain forward with padding, generation) a model on segment attention
    computes exactly what its base kernel computes."""
    from conftest import tiny_llama

    model = tiny_llama(attn=base, seed=2).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.config._attn_implementation = segment_implementation(base)
        assert uses_segment_attention(model.config)
        got = model(input_ids=ids, attention_mask=mask).logits
        got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert torch.equal(got_gen, want_gen)


def test_placeholder_mask_fails_loudly_in_other_kernels():
    """The empty mask handed over with a plan must not be usable as "attend everywhere"."""
    from conftest import tiny_llama

    model = tiny_llama(seed=2)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(RuntimeError):
        model(input_ids=ids, attention_mask=prepared_mask_placeholder(1, "cpu"))


def test_unblocked_runs_match_dense(monkeypatch):
    """The runs uncut (as SDPA runs them on CUDA), and partly cut (long runs stay whole on CPU),
    give the dense mask's log-probs too."""
    from conftest import tiny_llama

    from preftune import attention
    from preftune.engine import sequence_logps

    model = tiny_llama(seed=4)
    batch = _segments_batch([(7, 3, 5), (2, 4, 2), (5, 1, 6)])
    dense = sequence_logps(model, batch)
    model.config._attn_implementation = segment_implementation("sdpa")
    # uncut, and cut into blocks of 2 except the runs with more than 8 keys (both kinds in one batch)
    for block, uncut_above in ((None, None), (2, 8)):
        monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", block)
        monkeypatch.setattr(attention, "CPU_UNCUT_ABOVE_KEYS", uncut_above)
        seg = sequence_logps(model, batch)
        torch.testing.assert_close(seg.chosen_sum, dense.chosen_sum, rtol=0, atol=1e-5)
        torch.testing.assert_close(seg.rejected_sum, dense.rejected_sum, rtol=0, atol=1e-5)


def test_segment_path_builds_no_dense_mask(monkeypatch):
    from conftest import tiny_llama

    from preftune import layout
    from preftune.engine import sequence_logps

    model = tiny_llama(seed=3)
    batch = _segments_batch([(4, 2, 3), (2, 2, 2)])
    dense = sequence_logps(model, batch)  # sdpa: the reference path builds the (T, T) mask

    def refuse(_batch):
        raise AssertionError("segment attention must not build the dense mask")

    monkeypatch.setattr(layout, "dense_segment_mask", refuse)
    model.config._attn_implementation = segment_implementation("sdpa")
    seg = sequence_logps(model, batch)
    torch.testing.assert_close(seg.chosen_sum, dense.chosen_sum, rtol=0, atol=1e-5)
    torch.testing.assert_close(seg.rejected_sum, dense.rejected_sum, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU kernels: run wherever CUDA exists


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine has none)")


@needs_cuda
@pytest.mark.parametrize("base", ["sdpa", "flash_attention_2"])
def test_cuda_segment_kernels_match_dense(base):
    if base == "flash_attention_2" and not flash_attn_available():
        pytest.skip("needs the flash_attn package")
    from conftest import tiny_llama

    from preftune.engine import sequence_logps

    dtype = torch.bfloat16
    model = tiny_llama(seed=5, sliding_window=None).to("cuda", dtype)
    batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v
             for k, v in _segments_batch([(9, 4, 6), (3, 2, 5), (12, 1, 2)], row_budget=40).items()}
    dense = sequence_logps(model, batch)
    model.config._attn_implementation = segment_implementation(base)
    seg = sequence_logps(model, batch)
    tol = 0.05 * (1 + dense.chosen_sum.abs().max().item())  # bf16 kernels differ in summation order
    torch.testing.assert_close(seg.chosen_sum.float(), dense.chosen_sum.float(), rtol=0, atol=tol)
    torch.testing.assert_close(seg.rejected_sum.float(), dense.rejected_sum.float(), rtol=0, atol=tol)


def test_packed_layout_chooses_segment_attention(caplog):
    from preftune.training_model import choose_device

    packed = choose_device("float32", "auto", "packed")
    assert packed.attn_implementation == ("preftune_flash_attention_2" if flash_attn_available() else "preftune_sdpa")
    assert "attention segments (prefix sharing" in packed.describe()
    assert choose_device("float32", "eager", "packed").attn_implementation == "preftune_eager"
    assert choose_device("float32", "sdpa", "padded").attn_implementation == "sdpa"  # the padded layout needs no segments
    with caplog.at_level("WARNING"):
        assert choose_device("float32", "flex_attention", "packed").attn_implementation == "preftune_sdpa"
    assert "cannot run the packed layout's segment attention" in caplog.text


def _reference_attention(q, k, v, mask, scaling):
    """Float64 masked softmax attention over whole rows, ``(B, H, T, D)`` in, ``(B, T, H, D)``
    out; queries with no visible key give zeros."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scaling
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bhkd->bqhd", probs, v)


@pytest.mark.parametrize("block,window", [(None, None), (2, None), (3, 4), (64, None)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_runs_kernel_against_float64(block, window, kv_heads, monkeypatch):
    """The one-node CPU kernel (PyTorch's flash kernel per run, outputs written in place, keys
    re-gathered in the backward): output and the gradients of query, key and value against a
    float64 reference over the dense mask, with grouped-query heads, a sliding window, runs cut
    into query blocks or not, and several pairs in a row (the prompt's keys collect gradients
    from two runs)."""
    from preftune import attention

    monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", block)
    batch = _segments_batch([(7, 3, 5), (2, 4, 2), (5, 1, 6), (4, 6, 3)], row_budget=30)
    plan = _plan(batch)
    mask = _dense_with_window(batch, window)
    rows, t = batch["input_ids"].shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(rows, h, t, 8, generator=g, requires_grad=True) for h in (4, kv_heads, kv_heads))
    grad_out = torch.randn(rows, t, 4, 8, generator=g) * batch["token_mask"][:, :, None, None]
    out = attention._cpu_runs_attention(q, k, v, plan, 8**-0.5, window)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    real = batch["token_mask"].bool()[:, :, None, None]
    want_out = _reference_attention(q64, k64, v64, mask, 8**-0.5) * real  # padding: never read
    want = torch.autograd.grad(want_out, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-5)
    assert not out[~batch["token_mask"].bool()].any()  # padding queries: zero output
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_cpu_runs_kernel_under_bf16_autocast_is_float32_sdpa_on_rounded_inputs():
    """Under CPU bf16 autocast q/k/v are rounded to bf16 (as SDPA would), the kernel runs in
    float32 on them (faster on CPU than its bf16 form, and more precise), the output is rounded
    to bf16, and gradients flow back to the fp32 inputs: equal to SDPA called per run in float32
    on the rounded inputs, then rounded."""
    import torch.nn.functional as F

    from preftune import attention

    batch = _segments_batch([(9, 4, 6), (3, 5, 2)])
    plan = _plan(batch)
    rows, t = batch["input_ids"].shape
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(rows, h, t, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention._cpu_runs_attention(q, k, v, plan, 0.25, None)
    rq, rk, rv = (x.detach().bfloat16().float() for x in (q, k, v))
    want = torch.zeros(out.shape, dtype=torch.float32)
    for run in plan.blocks(attention.CPU_QUERY_BLOCK, attention.CPU_UNCUT_ABOVE_KEYS):
        keys = torch.cat([torch.arange(a, b) for a, b in run.keys])
        s, e = run.q_start, run.q_start + run.q_len
        mask = plan.run_mask(run, None)
        o = F.scaled_dot_product_attention(rq[run.row : run.row + 1, :, s:e], rk[run.row : run.row + 1, :, keys],
                                           rv[run.row : run.row + 1, :, keys], attn_mask=mask, is_causal=mask is None,
                                           scale=0.25, enable_gqa=True)
        want[run.row, s:e] = o[0].transpose(0, 1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.bfloat16())
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
