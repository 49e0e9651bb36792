"""Chunked LM-head log-probs (``chunked_token_logps``) against the full-logits computation.

Two references: preftune's own ``reference_token_logps`` (fp32, full ``(N, V)`` logits) and an
independent float64 one written here from the formula

    z = h W^T + b,   l = c * tanh(s * z / c)  (or s * z without soft-cap),
    logp_n = l[n, y_n] - logsumexp_v l[n, v].

Values are compared to 1e-5 absolute, gradients (w.r.t. hidden, weight and bias, under a
random upstream gradient) to 1e-4 relative to the largest entry of each gradient.
"""

from __future__ import annotations

import pytest
import torch

from preftune.logprobs import LogitTransform, chunked_token_logps, reference_token_logps

N, H, V = 37, 16, 101
VALUE_ATOL = 1e-5
GRAD_RTOL = 1e-4

TRANSFORMS = {
    "plain": LogitTransform(),
    "granite_scale": LogitTransform(scale=1 / 8.0),  # Granite: logits / logits_scaling
    "cohere_scale": LogitTransform(scale=0.625),  # Cohere: logits * logit_scale
    "gemma2_softcap": LogitTransform(softcap=3.0),  # Gemma 2: c * tanh(z / c)
    "scale_and_softcap": LogitTransform(scale=2.0, softcap=5.0),
}


def f64_logps(hidden, weight, targets, bias=None, transform=LogitTransform()):
    """Independent float64 reference (not preftune code)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)


def make_inputs(n=N, seed=0, bias=True, dtype=torch.float32, logit_scale=4.0):
    """Logits of std ~``logit_scale``, so soft-capping and the softmax tail both matter."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (logit_scale / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    if n >= 2:
        targets[0], targets[-1] = 0, V - 1  # vocab edges
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_(True)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets, upstream.float()


def grads(fn, hidden, weight, bias, targets, upstream):
    out = fn(hidden, weight, targets, bias)
    wrt = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    gs = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), wrt)
    return out.detach(), gs


def assert_rel_close(got, want, rtol=GRAD_RTOL, what=""):
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert scale > 0, f"{what}: zero reference gradient proves nothing"
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


@pytest.mark.parametrize("tname", list(TRANSFORMS))
@pytest.mark.parametrize("has_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("chunk", [1, 7, N, N + 50], ids=["chunk1", "chunk7", "chunkN", "chunk>N"])
def test_chunked_matches_references(chunk, has_bias, tname):
    tf = TRANSFORMS[tname]
    h, w, b, y, up = make_inputs(seed=chunk + 3 * has_bias, bias=has_bias)

    def chunked(h_, w_, y_, b_):
        return chunked_token_logps(h_, w_, y_, b_, transform=tf, chunk_size=chunk)

    def ref(h_, w_, y_, b_):
        return reference_token_logps(h_, w_, y_, b_, transform=tf)

    def ref64(h_, w_, y_, b_):
        return f64_logps(h_, w_, y_, b_, transform=tf)

    out, g = grads(chunked, h, w, b, y, up)
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert (out <= 0).all()
    for name, fn in (("reference_token_logps", ref), ("float64", ref64)):
        want, g_want = grads(fn, h, w, b, y, up)
        torch.testing.assert_close(out.double(), want.double(), rtol=0, atol=VALUE_ATOL)
        for gi, gw, what in zip(g, g_want, ("hidden", "weight", "bias")):
            assert gi.dtype == torch.float32
            assert_rel_close(gi, gw, what=f"{name} d/d{what}")


def test_transform_changes_the_answer():
    """The transforms above are not no-ops on these inputs (so the tests could fail)."""
    h, w, b, y, _ = make_inputs()
    plain = f64_logps(h, w, y, b)
    for name, tf in TRANSFORMS.items():
        if name != "plain":
            assert (f64_logps(h, w, y, b, tf) - plain).abs().max() > 0.1, name


def test_large_logits_are_stable():
    """Logits of size ~1e3 (fp32 exp overflows at 88): values and gradients stay finite and exact."""
    h, w, b, y, up = make_inputs(seed=5, logit_scale=1000.0)
    out, g = grads(lambda *a: chunked_token_logps(*a, chunk_size=5), h, w, b, y, up)
    want, g_want = grads(f64_logps, h, w, b, y, up)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in g)
    assert out.min() < -100  # really large logits
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-4)  # fp32 at |logp| ~ 1e3
    for gi, gw in zip(g, g_want):
        assert_rel_close(gi, gw)


@pytest.mark.parametrize("target", [0, V - 1])
def test_targets_at_vocab_edges(target):
    h, w, b, _, up = make_inputs(n=9, seed=11)
    y = torch.full((9,), target)
    out, g = grads(lambda *a: chunked_token_logps(*a, chunk_size=4), h, w, b, y, up)
    want, g_want = grads(f64_logps, h, w, b, y, up)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=VALUE_ATOL)
    for gi, gw in zip(g, g_want):
        assert_rel_close(gi, gw)


def test_only_some_inputs_need_grad():
    """Frozen head (LoRA on the decoder only): gradient for hidden alone, and for weight alone."""
    h, w, b, y, up = make_inputs(seed=13)
    w_frozen, b_frozen = w.detach(), b.detach()
    out = chunked_token_logps(h, w_frozen, y, b_frozen, chunk_size=6)
    (gh,) = torch.autograd.grad((out * up).sum(), [h])
    (gh_want,) = torch.autograd.grad((f64_logps(h, w_frozen, y, b_frozen) * up.double()).sum(), [h])
    assert_rel_close(gh, gh_want)
    h_frozen = h.detach()
    out = chunked_token_logps(h_frozen, w, y, b, chunk_size=6)
    gw, gb = torch.autograd.grad((out * up).sum(), [w, b])
    gw_want, gb_want = torch.autograd.grad((f64_logps(h_frozen, w, y, b) * up.double()).sum(), [w, b])
    assert_rel_close(gw, gw_want)
    assert_rel_close(gb, gb_want)


def test_gradcheck_float64():
    """``torch.autograd.gradcheck`` of the custom backward (inputs in float64; the function
    computes in float32 internally, hence the loose finite-difference tolerances)."""
    g = torch.Generator().manual_seed(17)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 10, 7, 3])
    tf = LogitTransform(scale=0.5, softcap=2.0)
    fn = lambda h_, w_, b_: chunked_token_logps(h_, w_, y, b_, transform=tf, chunk_size=2).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_empty_input():
    h = torch.zeros(0, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    out = chunked_token_logps(h, w, y)
    ref = reference_token_logps(h, w, y)
    assert out.shape == ref.shape == (0,) and out.dtype == torch.float32
    # usable inside a loss like the reference: summing it and back-propagating gives zero gradients
    gh, gw = torch.autograd.grad(out.sum() + (w * 0).sum(), [h, w], allow_unused=True)
    assert gh is None or (gh.shape == h.shape and not gh.any())
    assert not gw.any()


def test_bad_chunk_size():
    h, w, _, y, _ = make_inputs(n=3)
    with pytest.raises(ValueError):
        chunked_token_logps(h, w, y, chunk_size=-1)


def test_auto_chunk_rows_by_vocabulary():
    """0 = auto: about 128 MiB of float32 logits per chunk, within 256..1024 rows; a positive
    size is taken as given. The auto path computes the same log-probs."""
    from preftune.logprobs import chunk_rows

    assert chunk_rows(0, 151_936) == 256  # Qwen2: 1024 rows would be 622 MB
    assert chunk_rows(0, 65_536) == 512
    assert chunk_rows(0, 32_000) == 1024  # Llama-2
    assert chunk_rows(0, 101) == 1024
    assert chunk_rows(7, 151_936) == 7
    h, w, b, y, _ = make_inputs(seed=3)
    torch.testing.assert_close(chunked_token_logps(h, w, y, b, chunk_size=0), chunked_token_logps(h, w, y, b, chunk_size=N), rtol=0, atol=0)


def test_no_grad_path():
    h, w, b, y, _ = make_inputs(seed=19)
    with torch.no_grad():
        out = chunked_token_logps(h, w, y, b, transform=TRANSFORMS["scale_and_softcap"], chunk_size=8)
    assert not out.requires_grad and out.grad_fn is None
    want = f64_logps(h.detach(), w.detach(), y, b.detach(), TRANSFORMS["scale_and_softcap"])
    torch.testing.assert_close(out.double(), want, rtol=0, atol=VALUE_ATOL)


@pytest.mark.parametrize("tname", ["plain", "gemma2_softcap"])
def test_bf16_inputs(tname):
    """bf16 hidden/weight/bias: computed in fp32 internally, fp32 log-probs out, bf16 grads out.

    Against the reference on the *same* bf16 values the forward is fp32-exact; gradients are
    rounded to bf16 (8 bits of mantissa), so 1e-2 relative.
    """
    tf = TRANSFORMS[tname]
    h, w, b, y, up = make_inputs(seed=23, dtype=torch.bfloat16)
    out, g = grads(lambda *a: chunked_token_logps(*a, transform=tf, chunk_size=10), h, w, b, y, up)
    want, g_want = grads(lambda *a: f64_logps(*a, transform=tf), h, w, b, y, up)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)
    for gi, gw, t in zip(g, g_want, (h, w, b)):
        assert gi.dtype == torch.bfloat16 == t.dtype
        assert_rel_close(gi, gw, rtol=1e-2)
    # and loosely against the fp32 computation from the unrounded inputs
    h32, w32, b32, _, _ = make_inputs(seed=23)
    torch.testing.assert_close(out, reference_token_logps(h32, w32, y, b32, tf).detach(), rtol=0, atol=0.3)


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5), LogitTransform(scale=2.0, softcap=3.0)], ids=["plain", "scale", "softcap"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_softmax_cache_path_matches_reference(transform, chunk):
    """--logprob_cache_mb keeps the forward's softmax; values and all gradients must not change."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(23, 12, generator=g, requires_grad=True)
    w = torch.randn(41, 12, generator=g, requires_grad=True)
    b = torch.randn(41, generator=g, requires_grad=True)
    y = torch.randint(0, 41, (23,), generator=g)
    y[4] = y[9]  # a repeated target inside one chunk exercises the index_add of the factored gradient
    up = torch.randn(23, generator=g)
    ref = reference_token_logps(h, w, y, b, transform)
    ref_grads = torch.autograd.grad((ref * up).sum(), (h, w, b))
    for cache_mb in (0.0, 1.0):
        out = chunked_token_logps(h, w, y, b, transform, chunk_size=chunk, cache_mb=cache_mb)
        grads = torch.autograd.grad((out * up).sum(), (h, w, b))
        assert torch.allclose(out, ref, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item() + 1e-6)


def _bf16_logits_reference(hidden, weight, targets, bias, transform):
    """float64 reference of the mixed-precision head: inputs rounded to bf16, the matmul's output
    rounded to bf16 (what a bf16 matmul returns), then everything else in float64."""
    z = (hidden.detach().bfloat16().double() @ weight.detach().bfloat16().double().T).bfloat16().double()
    if bias is not None:
        z = z + bias.detach().double()
    z = z * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)


@pytest.mark.parametrize("tname", ["plain", "gemma2_softcap"])
@pytest.mark.parametrize("cache_mb", [0.0, 64.0], ids=["recompute", "cached"])
def test_bf16_compute_dtype_under_autocast(tname, cache_mb):
    """Mixed precision: fp32 inputs, bf16 matmuls, fp32 softmax. Under an active autocast the
    function must still produce float32 log-probs and float32 gradients, match a float64 model of
    that rounding, and stay within bf16 distance of the full float32 answer."""
    tf = TRANSFORMS[tname]
    h, w, b, y, up = make_inputs(seed=29)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, g = grads(lambda *a: chunked_token_logps(*a, transform=tf, chunk_size=8, cache_mb=cache_mb, compute_dtype=torch.bfloat16),
                       h, w, b, y, up)
        out32, g32 = grads(lambda *a: chunked_token_logps(*a, transform=tf, chunk_size=8, cache_mb=cache_mb), h, w, b, y, up)
    assert out.dtype == torch.float32 and all(gi.dtype == torch.float32 for gi in g)
    # autocast is off inside: the float32 compute path is exact even under autocast
    torch.testing.assert_close(out32.double(), f64_logps(h, w, y, b, tf).detach(), rtol=0, atol=VALUE_ATOL)
    torch.testing.assert_close(out.double(), _bf16_logits_reference(h, w, y, b, tf), rtol=0, atol=2e-3)
    # bf16 really was used: the answer moved, by about bf16's resolution of the logits
    gap = (out - out32).abs().max().item()
    assert 1e-4 < gap < 0.1
    for gi, gw, name in zip(g, g32, ("hidden", "weight", "bias")):
        assert_rel_close(gi, gw, rtol=3e-2, what=name)


def test_bf16_softmax_cache_is_the_recompute():
    """The kept softmax, rounded to bf16, gives the gradients the recompute gives (both round the
    same float32 softmax of the same bf16 logits)."""
    h, w, b, y, up = make_inputs(seed=31)
    run = lambda mb: grads(lambda *a: chunked_token_logps(*a, chunk_size=8, cache_mb=mb, compute_dtype=torch.bfloat16), h, w, b, y, up)  # noqa: E731
    (o1, g1), (o2, g2) = run(0.0), run(64.0)
    assert torch.equal(o1, o2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tname", list(TRANSFORMS))
@pytest.mark.parametrize("chunk", [1, 7, N + 50], ids=["chunk1", "chunk7", "chunk>N"])
@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_frozen_head_input_directions(tname, chunk, compute):
    """Frozen head (LoRA): the forward computes ``J = d logp / d hidden`` and the backward is
    ``g * J``. Against float64 (fp32) and against the recomputing backward (the path a trainable
    head takes) on the same inputs."""
    tf = TRANSFORMS[tname]
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    h, w, b, y, up = make_inputs(seed=41 + chunk)
    frozen_w, frozen_b = w.detach(), b.detach()
    run = lambda w_, b_, mb=0.0: grads(lambda h_, w2, y_, b2: chunked_token_logps(h_, w2, y_, b2, transform=tf, chunk_size=chunk,  # noqa: E731
                                                                                   cache_mb=mb, compute_dtype=dtype), h, w_, b_, y, up)
    out, (g_frozen,) = run(frozen_w, frozen_b)
    out_rec, g_rec = run(w, b)  # the head trains: the backward recomputes the logits
    assert torch.equal(out, out_rec)
    if compute == "fp32":
        want, (g_want,) = grads(lambda h_, w2, y_, b2: f64_logps(h_, w2, y_, b2, tf), h, frozen_w, frozen_b, y, up)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=VALUE_ATOL)
        assert_rel_close(g_frozen, g_want, what="d/dhidden vs float64")
    # the two differ only in how the softmax is rounded (the forward's exp(l - max) / sum against
    # the recompute's exp(l - logsumexp))
    assert_rel_close(g_frozen, g_rec[0], rtol=1e-6 if compute == "fp32" else 1e-2, what="d/dhidden vs recompute")
    # the cache option does not change the frozen path (nothing V-sized is kept)
    _, (g_cached,) = run(frozen_w, frozen_b, 64.0)
    assert torch.equal(g_frozen, g_cached)


def test_frozen_head_keeps_only_the_directions():
    """What the frozen-head path keeps for the backward is ``(N, H)``, never ``(N, V)``."""
    h, w, b, y, up = make_inputs(seed=53)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = chunked_token_logps(h, w.detach(), y, b.detach(), chunk_size=8, cache_mb=64.0)
    assert sum(saved) == N * H, saved
    (gh,) = torch.autograd.grad((out * up).sum(), [h])
    assert torch.isfinite(gh).all() and gh.abs().max() > 0


@pytest.mark.parametrize("path", ["recompute", "cached", "frozen_head"])
@pytest.mark.parametrize("chunk", [7, N + 50], ids=["chunk7", "chunk>N"])
def test_softmax_in_row_blocks_matches_float64(monkeypatch, path, chunk):
    """The softmax and the backward's recomputed probabilities run over blocks of rows
    (``SOFTMAX_BLOCK_BYTES``); with blocks of 3 rows (a chunk of 7 is 3 + 3 + 1) values and
    gradients still match the float64 reference on every path."""
    from preftune import logprobs

    monkeypatch.setattr(logprobs, "SOFTMAX_BLOCK_BYTES", 3 * V * 4)
    assert [b.shape[0] for b in logprobs._row_blocks(torch.zeros(7, V))] == [3, 3, 1]
    h, w, b, y, up = make_inputs(seed=11)
    if path == "frozen_head":
        w, b = w.detach(), b.detach()

    def chunked(h_, w_, y_, b_):
        return chunked_token_logps(h_, w_, y_, b_, chunk_size=chunk, cache_mb=64.0 if path == "cached" else 0.0)

    out, g = grads(chunked, h, w, b, y, up)
    want, g_want = grads(lambda h_, w_, y_, b_: f64_logps(h_, w_, y_, b_), h, w, b, y, up)
    torch.testing.assert_close(out.double(), want.double(), rtol=0, atol=VALUE_ATOL)
    assert len(g) == (1 if path == "frozen_head" else 3)
    for gi, gw, what in zip(g, g_want, ("hidden", "weight", "bias")):
        assert_rel_close(gi, gw, what=f"{path} d/d{what}")
