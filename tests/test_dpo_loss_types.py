"""Every DPO loss type of TRL 1.16 and the options (f-DPO, WPO, LD-DPO, mixtures), checked three ways.

(a) hand-derived numbers for every loss type, maths in the comments;
(b) an independent float64 reference written here from TRL 1.16's ``DPOTrainer._compute_loss``
    formulas (sorting the batch for ``aot*`` exactly as TRL does), never calling preftune, on
    random and edge inputs of odd batch sizes: values (as multisets for the sorting types, whose
    per-pair order differs) and gradients of the batch loss;
(c) properties: policy == reference, rewards, f-divergence at its identity cases, rank matching
    over a larger window equal to sorting that window.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, dpo_loss, f_divergence_scores, rank_partners, wpo_weights

f64 = torch.float64
PER_PAIR_TYPES = [t for t in DPO_LOSS_TYPES if t != "sft"]
SIZES = (3, 47)


def ls(z):
    """log sigma(z), written without torch's logsigmoid."""
    return torch.where(z >= 0, -torch.log1p(torch.exp(-z)), z - torch.log1p(torch.exp(z)))


def f_ref(u, kind, alpha=0.5):
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + ls(u)
    return (torch.exp((alpha - 1) * u) - 1) / (alpha - 1)


def trl_ref(pc, pr, rc, rr, nc, nr, loss_type, beta, eps=0.0, tau=0.05, fdiv="reverse_kl", alpha=0.5):
    """TRL 1.16's per_sequence_loss, float64 (aot*: in sorted order, as TRL returns it)."""
    c, r = pc - rc, pr - rr
    sc, sr = f_ref(c, fdiv, alpha), f_ref(r, fdiv, alpha)
    d = sc - sr
    sig = torch.sigmoid
    if loss_type == "sigmoid":
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)  # eps = 0 in TRL; preftune keeps cDPO
    if loss_type == "hinge":
        return torch.clamp(1 - beta * d, min=0)
    if loss_type == "ipo":
        return (sc / nc - sr / nr - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        qw, ql = sig(beta * d), sig(-beta * d)
        return qw * (torch.log(qw) - math.log(1 - eps)) + ql * (torch.log(ql) - math.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    if loss_type == "robust":
        return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -ls(beta * c) - ls(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    if loss_type == "aot_unpaired":
        delta = torch.sort(c).values - torch.sort(r).values
        return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    if loss_type == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if loss_type == "apo_down":
        return sig(beta * c) + 1 - sig(beta * (c - r))
    if loss_type == "discopop":
        x = beta * d
        m = sig(x / tau)
        return -ls(x) * (1 - m) + torch.exp(-x) * m
    if loss_type == "sigmoid_norm":
        return -ls(beta * (sc / nc - sr / nr))
    raise AssertionError(loss_type)


def inputs(n, seed):
    """Summed log-probs of policy and reference, completion lengths; random plus edge pairs."""
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(n, generator=g, dtype=f64) * 80, -torch.rand(n, generator=g, dtype=f64) * 80
    rc, rr = pc + torch.randn(n, generator=g, dtype=f64) * 3, pr + torch.randn(n, generator=g, dtype=f64) * 3
    nc, nr = torch.randint(1, 40, (n,), generator=g).to(f64), torch.randint(1, 40, (n,), generator=g).to(f64)
    # edges: policy == reference, log-probs near 0, very negative ones, large log-ratios both ways
    edge = torch.tensor([[-5.0, -7.0, -5.0, -7.0, 3, 9],
                         [-1e-6, -300.0, -1e-3, -250.0, 1, 120],
                         [-600.0, -1e-6, -550.0, -2e-6, 200, 1],
                         [-40.0, -90.0, -60.0, -30.0, 7, 7]], dtype=f64)
    cols = [torch.cat([x, edge[:, j]]) for j, x in enumerate((pc, pr, rc, rr, nc, nr))]
    return cols


def grads_of(fn, *xs):
    """Values and the gradient of their sum with respect to every input (zeros where unused:
    the rank-matched types give the reference log-probs, constants in training, no gradient)."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, xs)]


KNOBS = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1), "aot": dict(label_smoothing=0.2),
         "aot_unpaired": dict(label_smoothing=0.05), "sigmoid": dict(label_smoothing=0.15)}


@pytest.mark.parametrize("loss_type", PER_PAIR_TYPES)
@pytest.mark.parametrize("n", SIZES)
def test_every_loss_type_matches_trl_formula_float64(loss_type, n):
    pc, pr, rc, rr, nc, nr = inputs(n, seed=n + len(loss_type))
    beta, eps = 0.1, KNOBS.get(loss_type, {}).get("label_smoothing", 0.0)

    def ours(a, b, c, d):
        return dpo_loss(a, b, c, d, beta, loss_type, eps, chosen_count=nc, rejected_count=nr).losses

    got, g_got = grads_of(ours, pc, pr, rc, rr)
    want, g_want = grads_of(lambda a, b, c, d: trl_ref(a, b, c, d, nc, nr, loss_type, beta, eps), pc, pr, rc, rr)
    if loss_type.startswith("aot"):  # per-pair order differs from TRL's sorted order: compare as multisets
        got, want = torch.sort(got).values, torch.sort(want).values
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    policy_only = 2 if loss_type == "aot" else 4  # aot's reference margins are sorted constants
    for a, b in zip(g_got[:policy_only], g_want[:policy_only]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # float32 inputs against the float64 reference at the same (rounded) inputs
    x32 = [t.float() for t in (pc, pr, rc, rr)]
    got32 = dpo_loss(*x32, beta, loss_type, eps, chosen_count=nc.float(), rejected_count=nr.float()).losses
    want32 = trl_ref(*(t.double() for t in x32), nc, nr, loss_type, beta, eps)
    if loss_type.startswith("aot"):
        got32, want32 = torch.sort(got32).values, torch.sort(want32).values
    torch.testing.assert_close(got32.double(), want32, rtol=2e-5, atol=2e-5)
    assert torch.isfinite(got32).all()


@pytest.mark.parametrize("loss_type", PER_PAIR_TYPES)
def test_gradcheck(loss_type):
    g = torch.Generator().manual_seed(11)
    # log-ratios in [-1.5, 1.5]: away from the hinge kink (beta d = 1 needs |d| = 5) and from ties
    base = -torch.rand(6, generator=g, dtype=f64) * 10 - 1
    xs = [base + 0.1 * torch.arange(6, dtype=f64) * k for k in (1.0, -0.7, 0.4, 1.3)]
    counts = torch.arange(1, 7, dtype=f64)
    eps = KNOBS.get(loss_type, {}).get("label_smoothing", 0.0)
    # rank-matched types: check the batch loss (their per-pair split is a bookkeeping choice), and
    # for aot only the policy inputs (its sorted reference margins are constants)
    reduce = (lambda t: t.sum()) if loss_type.startswith("aot") else (lambda t: t)
    for i, x in enumerate(xs):
        x.requires_grad_(loss_type != "aot" or i < 2)
    assert torch.autograd.gradcheck(lambda *a: reduce(dpo_loss(*a, 0.3, loss_type, eps, chosen_count=counts, rejected_count=counts.flip(0)).losses), xs)


def test_hand_values():
    # policy chosen -10, rejected -12; reference chosen -11, rejected -11:
    # c = 1, r = -1, d = 2, policy margin 2, reference margin 0; |y_w| = 2, |y_l| = 4.
    pc, pr, rc, rr = (torch.tensor([v], dtype=f64) for v in (-10.0, -12.0, -11.0, -11.0))
    counts = dict(chosen_count=torch.tensor([2.0], dtype=f64), rejected_count=torch.tensor([4.0], dtype=f64))
    L = lambda t, beta=0.5, eps=0.0, **kw: dpo_loss(pc, pr, rc, rr, beta, t, eps, **counts, **kw).losses.item()  # noqa: E731
    e = math.exp
    # nca_pair, beta 0.5: -log s(0.5) - 0.5 log s(-0.5) - 0.5 log s(0.5) = 1.5 log(1+e^-.5) + .5 log(1+e^.5)
    assert L("nca_pair") == pytest.approx(1.5 * math.log1p(e(-0.5)) + 0.5 * math.log1p(e(0.5)), rel=1e-12)
    # bco_pair: -log s(0.5) - log s(0.5) = 2 log(1 + e^-0.5)
    assert L("bco_pair") == pytest.approx(2 * math.log1p(e(-0.5)), rel=1e-12)
    # bco_pair with reward shift 0.5: -log s(0) - log s(-(-0.5 - 0.5)) = log 2 + log(1 + e^-1)
    assert L("bco_pair", reward_shift=0.5) == pytest.approx(math.log(2) + math.log1p(e(-1)), rel=1e-12)
    # sppo_hard, beta 0.5: (1 - 1)^2 + (-1 + 1)^2 = 0;  beta 0.25: (1 - 2)^2 + (-1 + 2)^2 = 2
    assert L("sppo_hard") == pytest.approx(0.0, abs=1e-15)
    assert L("sppo_hard", beta=0.25) == pytest.approx(2.0, rel=1e-12)
    # apo_zero: 1 - s(0.5) + s(-0.5) = 2 s(-0.5);  apo_down: s(0.5) + 1 - s(1)
    s = lambda x: 1 / (1 + e(-x))  # noqa: E731
    assert L("apo_zero") == pytest.approx(2 * s(-0.5), rel=1e-12)
    assert L("apo_down") == pytest.approx(s(0.5) + 1 - s(1.0), rel=1e-12)
    # exo_pair, eps 0.1: q_w = s(1), q_l = s(-1); q_w (log q_w - log .9) + q_l (log q_l - log .1)
    qw, ql = s(1.0), s(-1.0)
    assert L("exo_pair", eps=0.1) == pytest.approx(qw * (math.log(qw) - math.log(0.9)) + ql * (math.log(ql) - math.log(0.1)), rel=1e-12)
    # discopop, tau 0.05: x = 1, m = s(20); -log s(1) (1 - m) + e^-1 m
    m = s(20.0)
    assert L("discopop", discopop_tau=0.05) == pytest.approx(math.log1p(e(-1)) * (1 - m) + e(-1) * m, rel=1e-12)
    # sigmoid_norm: per-token d = 1/2 - (-1)/4 = 0.75, -log s(0.375);  ipo: (0.75 - 1)^2
    assert L("sigmoid_norm") == pytest.approx(math.log1p(e(-0.375)), rel=1e-12)
    assert L("ipo") == pytest.approx(0.0625, rel=1e-12)
    # one pair: aot's delta = 2 - 0 = 2 and aot_unpaired's = c - r = 2: both -log s(1) with eps 0
    assert L("aot") == pytest.approx(math.log1p(e(-1)), rel=1e-12)
    assert L("aot_unpaired") == pytest.approx(math.log1p(e(-1)), rel=1e-12)
    # sigmoid with eps 0.1 (cDPO): 0.9 log(1 + e^-1) + 0.1 log(1 + e)
    assert L("sigmoid", eps=0.1) == pytest.approx(0.9 * math.log1p(e(-1)) + 0.1 * math.log1p(e(1)), rel=1e-12)


@pytest.mark.parametrize("fdiv,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 1.7)])
@pytest.mark.parametrize("loss_type", [t for t in F_DIVERGENCE_LOSS_TYPES if t != "sft"])
def test_f_divergences_match_trl_formula(fdiv, alpha, loss_type):
    pc, pr, rc, rr, nc, nr = (t[:31] for t in inputs(31, seed=5))  # log-ratios of a few nats: e^{±u} stays finite
    eps = KNOBS.get(loss_type, {}).get("label_smoothing", 0.0)
    kw = dict(f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, chosen_count=nc, rejected_count=nr)
    got, g_got = grads_of(lambda *a: dpo_loss(*a, 0.1, loss_type, eps, **kw).losses, pc, pr, rc, rr)
    want, g_want = grads_of(lambda *a: trl_ref(*a, nc, nr, loss_type, 0.1, eps, fdiv=fdiv, alpha=alpha), pc, pr, rc, rr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_f_divergence_scores_hand_values_and_limits():
    u = torch.tensor([0.0, math.log(2.0), -math.log(4.0)], dtype=f64)
    # forward KL: 1 - 1/t at t = 1, 2, 1/4 -> 0, 1/2, -3;  JS: log(2t/(t+1)) -> 0, log(4/3), log(2/5)
    torch.testing.assert_close(f_divergence_scores(u, "forward_kl"), torch.tensor([0.0, 0.5, -3.0], dtype=f64))
    torch.testing.assert_close(f_divergence_scores(u, "js_divergence"), torch.tensor([0.0, math.log(4 / 3), math.log(2 / 5)], dtype=f64))
    # alpha 0.5: (t^-0.5 - 1) / -0.5 -> 0, 2 - sqrt 2, -2;  alpha -> 1 is log t (reverse KL)
    torch.testing.assert_close(f_divergence_scores(u, "alpha_divergence", 0.5), torch.tensor([0.0, 2 - math.sqrt(2), -2.0], dtype=f64))
    torch.testing.assert_close(f_divergence_scores(u, "alpha_divergence", 1.0), u)
    # TRL's clamp: (alpha - 1) u is capped at 80 so exp stays finite (alpha 0.5, u = -1000 -> (e^80 - 1) / -0.5)
    big = f_divergence_scores(torch.tensor([-1000.0]), "alpha_divergence", 0.5)
    assert torch.isfinite(big).all() and big.item() == pytest.approx(-2 * math.expm1(80), rel=1e-6)
    with pytest.raises(ValueError, match="f_divergence_type"):
        f_divergence_scores(u, "hellinger")


def test_policy_equals_reference():
    """h = c = r = 0: known constants for every loss type (sigmoid family log 2, hinge 1, ipo 1/(4 beta^2), ...)."""
    x = -torch.rand(23, dtype=f64) * 50
    y = -torch.rand(23, dtype=f64) * 50
    beta = 0.25
    want = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * beta**2), "exo_pair": math.log(0.5) - 0.5 * math.log(0.999 * 0.001),
            "nca_pair": 2 * math.log(2), "robust": math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 2 * (0.5 / beta) ** 2,
            "aot": math.log(2), "aot_unpaired": math.log(2), "apo_zero": 1.0, "apo_down": 1.0,
            "discopop": 0.5 * math.log(2) + 0.5, "sigmoid_norm": math.log(2)}
    for t in PER_PAIR_TYPES:
        eps = 1e-3 if t == "exo_pair" else 0.0
        out = dpo_loss(x, y, x.clone(), y.clone(), beta, t, eps)
        torch.testing.assert_close(out.losses, torch.full_like(x, want[t]), rtol=1e-12, atol=1e-12, msg=t)
        assert not out.chosen_rewards.any() and not out.rejected_rewards.any()


def test_rank_partners_over_a_window_equal_sorting_the_window():
    """aot over a window of 3 micro-batches: per micro-batch partners taken from the whole window
    give exactly the loss (and gradients) of TRL sorting the whole window at once."""
    pc, pr, rc, rr, nc, nr = (t[:12] for t in inputs(12, seed=3))
    for loss_type in ("aot", "aot_unpaired"):
        whole, g_whole = grads_of(lambda *a: trl_ref(*a, nc, nr, loss_type, 0.1, 0.1), pc, pr, rc, rr)
        xs = [t.detach().clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
        a, b, c, d = xs
        partners_of = lambda idx: rank_partners(a - b, c - d, a - c, b - d, idx)  # noqa: E731
        total = sum(
            dpo_loss(a[idx], b[idx], c[idx], d[idx], 0.1, loss_type, 0.1, partners=partners_of(idx)).losses.sum()
            for idx in (torch.arange(0, 4), torch.arange(4, 9), torch.arange(9, 12))
        )
        g_parts = torch.autograd.grad(total, xs, allow_unused=True)
        assert total.item() == pytest.approx(whole.sum().item(), rel=1e-12)
        checked = 2 if loss_type == "aot" else 4  # aot: policy inputs (sorted reference margins are constants)
        for g1, g2 in zip(g_parts[:checked], g_whole[:checked]):
            torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
        # and sorting each micro-batch on its own (TRL under gradient accumulation) is different
        per_batch = sum(trl_ref(pc[i], pr[i], rc[i], rr[i], nc[i], nr[i], loss_type, 0.1, 0.1).sum()
                        for i in (slice(0, 4), slice(4, 9), slice(9, 12)))
        assert abs(per_batch.item() - whole.sum().item()) > 1e-3


def test_wpo_weights_hand_values():
    # mean aligned log-prob of chosen log(1/2) over 2 tokens, of rejected log(1/4) over 1 token: w = 1/2 * 1/4
    w = wpo_weights(torch.tensor([2 * math.log(0.5)]), torch.tensor([2.0]), torch.tensor([math.log(0.25)]), torch.tensor([1.0]))
    assert w.item() == pytest.approx(0.125, rel=1e-6) and not w.requires_grad


def test_refusals():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, "exo_pair", 0.0)
    with pytest.raises(ValueError, match="does not apply to 'nca_pair'"):
        dpo_loss(x, x, x, x, 0.1, "nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="per-pair loss"):
        dpo_loss(x, x, x, x, 0.1, "sft")
