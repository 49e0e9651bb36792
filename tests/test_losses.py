"""Preference losses, checked three ways (see ../shared/STYLE.md):

(a) hand-derived numbers, maths in the comments;
(b) an independent float64 reference written here from the paper formula (never calling
    preftune), on random inputs of odd batch sizes and on edge inputs (log-probs near 0 and
    very negative), values and gradients, plus ``gradcheck``;
(c) properties: DPO at policy == reference, reward definitions, robust(eps=0) == sigmoid,
    argument validation, finiteness where the maths is singular.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import cpo_loss, dpo_loss, log1mexp, orpo_loss, simpo_loss, slic_loss

BASIC_DPO_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # the other loss types: test_dpo_loss_types.py

f64 = torch.float64
SIZES = (3, 47, 31, 123)
# average log-probs at the edges: near 0 (probability ~1, odds huge) and very negative
EDGE_LOGPS = (-1e-6, -1e-5, -1e-3, -0.01, -math.log(2), -0.7, -1.0, -5.0, -20.0, -50.0, -80.0, -200.0)


def log_sigmoid_ref(z):
    """log sigma(z) = -log(1 + exp(-z)), written without preftune or logsigmoid."""
    return torch.where(z >= 0, -torch.log1p(torch.exp(-z)), z - torch.log1p(torch.exp(z)))


def orpo_ref(lc, lr, beta):
    """ORPO from its definition: P = exp(l), odds = P / (1 - P), L = -beta log sigma(log odds_c - log odds_r)."""
    pc, pr = torch.exp(lc), torch.exp(lr)
    log_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    return -beta * log_sigmoid_ref(log_odds), log_odds


def dpo_ref(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -log_sigmoid_ref(beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -log_sigmoid_ref(beta * h) - eps * -log_sigmoid_ref(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    raise AssertionError(loss_type)


def random_avg_logps(n, seed):
    """Length-averaged log-probs spread log-uniformly over [-200, -1e-6]."""
    g = torch.Generator().manual_seed(seed)
    return -(10 ** (torch.rand(n, generator=g, dtype=f64) * 8.3 - 6))


def random_sum_logps(n, seed, scale=300.0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(n, generator=g, dtype=f64) * scale


def value_and_grad(fn, *inputs):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out.sum(), xs)
    return out.detach(), grads


# ============================================================================================
# log1mexp


def test_log1mexp_hand_values():
    # log(1 - 1/2) = log 1/2;  log(1 - 1/4) = log 3/4;  log(1 - e^-1) = log((e - 1) / e)
    x = torch.tensor([math.log(0.5), math.log(0.25), -1.0], dtype=f64)
    want = torch.tensor([math.log(0.5), math.log(0.75), math.log((math.e - 1) / math.e)], dtype=f64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-15, atol=0)
    # near 0: 1 - e^x = -x - x^2/2 - ..., so log1mexp(-1e-6) = log(1e-6) + log(1 - 5e-7 + ...)
    assert log1mexp(torch.tensor(-1e-6, dtype=f64)).item() == pytest.approx(math.log(1e-6) - 5e-7, rel=1e-12)
    # very negative: log(1 - e^x) = -e^x - e^{2x}/2 ..., so log1mexp(-50) = -e^-50 to full relative
    # precision (a naive log(1 - exp(x)) returns exactly 0 here)
    for xv in (-50.0, -80.0, -200.0):
        assert log1mexp(torch.tensor(xv, dtype=f64)).item() == pytest.approx(-math.exp(xv), rel=1e-12)
        assert log1mexp(torch.tensor(xv)).item() == pytest.approx(-math.exp(xv), rel=1e-5)  # float32 too
    # x = 0: probability one, log(0) = -inf
    assert log1mexp(torch.tensor(0.0)).item() == -math.inf


@pytest.mark.parametrize("n", SIZES)
def test_log1mexp_against_reference(n):
    x = torch.cat([random_avg_logps(n, seed=n), torch.tensor(EDGE_LOGPS, dtype=f64)])
    got, (g,) = value_and_grad(log1mexp, x)
    # reference: math.log(-math.expm1(x)) per element in float64 (abs-accurate everywhere)
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=f64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    # analytic derivative: d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x)
    g_want = torch.tensor([-1.0 / math.expm1(-v) for v in x.tolist()], dtype=f64)
    torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-300)
    # float32 implementation against the float64 reference at the float32-rounded inputs
    x32 = x.float()
    got32, (g32,) = value_and_grad(log1mexp, x32)
    want32 = torch.tensor([math.log(-math.expm1(v)) for v in x32.double().tolist()], dtype=f64)
    g_want32 = torch.tensor([-1.0 / math.expm1(-v) for v in x32.double().tolist()], dtype=f64)
    torch.testing.assert_close(got32.double(), want32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g32.double(), g_want32, rtol=1e-5, atol=1e-30)


def test_log1mexp_gradcheck_and_finite_grads():
    x = torch.tensor([-1e-4, -0.3, -0.69, -0.7, -3.0, -30.0], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(log1mexp, (x,))
    # the unused branch must not poison the gradient with NaN (torch.where backward)
    for xv in (-1e-9, -1e-3, -100.0, -300.0, -1e4):
        for dt in (torch.float32, f64):
            t = torch.tensor(xv, dtype=dt, requires_grad=True)
            (g,) = torch.autograd.grad(log1mexp(t), t)
            assert torch.isfinite(g), (xv, dt)


# ============================================================================================
# ORPO


def test_orpo_hand_values():
    # lc = log 0.5, lr = log 0.25: odds_c = 0.5 / 0.5 = 1, odds_r = 0.25 / 0.75 = 1/3,
    # log odds ratio = log(1 / (1/3)) = log 3, sigma(log 3) = 3 / (1 + 3) = 3/4,
    # loss = -beta log(3/4) = beta log(4/3).
    beta = 0.1
    out = orpo_loss(torch.tensor([math.log(0.5)], dtype=f64), torch.tensor([math.log(0.25)], dtype=f64), beta)
    assert out.losses.item() == pytest.approx(beta * math.log(4 / 3), rel=1e-12)
    assert out.log_odds.item() == pytest.approx(math.log(3), rel=1e-12)
    assert out.log_odds_ratio.item() == pytest.approx(math.log(3 / 4), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * math.log(0.5), rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(beta * math.log(0.25), rel=1e-12)
    # swapped: log odds = -log 3, loss = -beta log sigma(-log 3) = -beta log(1/4) = beta log 4
    out = orpo_loss(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]), beta)
    assert out.losses.item() == pytest.approx(beta * math.log(4), rel=1e-6)
    # equal log-probs: log odds 0, loss beta log 2
    out = orpo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert out.losses.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert out.log_odds.item() == 0.0


def _orpo_inputs(n, seed):
    lc = random_avg_logps(n, seed)
    lr = random_avg_logps(n, seed + 1000)
    # append every (edge, edge) combination
    e = torch.tensor(EDGE_LOGPS, dtype=f64)
    lc = torch.cat([lc, e.repeat_interleave(len(e))])
    lr = torch.cat([lr, e.repeat(len(e))])
    return lc, lr


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_against_reference_float64(n, beta):
    lc, lr = _orpo_inputs(n, seed=n)
    got, (gc, gr) = value_and_grad(lambda a, b: orpo_loss(a, b, beta).losses, lc, lr)
    want, (wc, wr) = value_and_grad(lambda a, b: orpo_ref(a, b, beta)[0], lc, lr)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gc, wc, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gr, wr, rtol=1e-8, atol=1e-12)
    # and the analytic derivative: with z = log odds, dz/dlc = 1 / (1 - P_c), dz/dlr = -1 / (1 - P_r),
    # dL/dz = -beta sigma(-z)
    _, z = orpo_ref(lc, lr, beta)
    s = torch.sigmoid(-z)
    torch.testing.assert_close(gc, -beta * s / -torch.expm1(lc), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gr, beta * s / -torch.expm1(lr), rtol=1e-8, atol=1e-12)
    # diagnostics
    out = orpo_loss(lc, lr, beta)
    torch.testing.assert_close(out.log_odds, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.log_odds_ratio, log_sigmoid_ref(z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_orpo_float32_against_float64_reference(n):
    lc, lr = _orpo_inputs(n, seed=7 * n)
    lc32, lr32 = lc.float(), lr.float()
    beta = 0.25
    got, (gc, gr) = value_and_grad(lambda a, b: orpo_loss(a, b, beta).losses, lc32, lr32)
    assert got.dtype == torch.float32
    want, (wc, wr) = value_and_grad(lambda a, b: orpo_ref(a, b, beta)[0], lc32.double(), lr32.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc.double(), wc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gr.double(), wr, rtol=1e-4, atol=1e-6)


def test_orpo_gradcheck():
    lc = torch.tensor([-1e-4, -0.3, -0.69, -2.0, -40.0], dtype=f64, requires_grad=True)
    lr = torch.tensor([-0.5, -1e-3, -3.0, -0.7, -1.5], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, 0.3).losses, (lc, lr))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("lc", [0.0, -1e-9, -1e-7, -300.0, -1e4])
@pytest.mark.parametrize("lr", [0.0, -1e-9, -1e-3, -300.0])
def test_orpo_finite_at_singular_inputs(lc, lr, dtype):
    """P -> 1 makes the odds infinite (lc is clamped below 0); P -> 0 underflows exp.
    Values and gradients must stay finite, and the loss must stay a valid ORPO loss (>= 0)."""
    a = torch.tensor([lc], dtype=dtype, requires_grad=True)
    b = torch.tensor([lr], dtype=dtype, requires_grad=True)
    out = orpo_loss(a, b, 0.1)
    ga, gb = torch.autograd.grad(out.losses.sum(), [a, b])
    assert torch.isfinite(out.losses).all() and (out.losses >= 0).all()
    assert torch.isfinite(out.log_odds).all() and torch.isfinite(out.log_odds_ratio).all()
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert ga.item() <= 0 <= gb.item()  # raising the chosen log-prob never increases the loss


def test_orpo_prefers_chosen_direction():
    # a clear preference for chosen gives a small loss, the reverse a large one
    good = orpo_loss(torch.tensor([-0.1]), torch.tensor([-3.0]), 1.0).losses.item()
    bad = orpo_loss(torch.tensor([-3.0]), torch.tensor([-0.1]), 1.0).losses.item()
    assert good < 0.1 < 2.0 < bad


# ============================================================================================
# DPO


def test_dpo_hand_values():
    # policy chosen -10, rejected -12; reference chosen -11, rejected -11.
    # chosen ratio = -10 - -11 = 1, rejected ratio = -12 - -11 = -1, h = 1 - (-1) = 2.
    pc, pr, rc, rr = (torch.tensor([v], dtype=f64) for v in (-10.0, -12.0, -11.0, -11.0))
    # sigmoid, beta 0.5: beta h = 1, loss = -log sigma(1) = log(1 + e^-1)
    out = dpo_loss(pc, pr, rc, rr, 0.5, "sigmoid")
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5 * 1)
    assert out.rejected_rewards.item() == pytest.approx(0.5 * -1)
    # robust, eps 0.1: (0.9 log(1 + e^-1) - 0.1 log(1 + e)) / 0.8
    out = dpo_loss(pc, pr, rc, rr, 0.5, "robust", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx((0.9 * math.log(1 + math.exp(-1)) - 0.1 * math.log(1 + math.e)) / 0.8, rel=1e-12)
    # ipo, beta (tau) 1: (h - 1 / (2 tau))^2 = (2 - 0.5)^2 = 2.25;  beta 0.25: (2 - 2)^2 = 0
    assert dpo_loss(pc, pr, rc, rr, 1.0, "ipo").losses.item() == pytest.approx(2.25, rel=1e-12)
    assert dpo_loss(pc, pr, rc, rr, 0.25, "ipo").losses.item() == pytest.approx(0.0, abs=1e-12)
    # hinge: relu(1 - beta h): beta 0.25 -> 0.5;  beta 1 -> relu(-1) = 0
    assert dpo_loss(pc, pr, rc, rr, 0.25, "hinge").losses.item() == pytest.approx(0.5, rel=1e-12)
    assert dpo_loss(pc, pr, rc, rr, 1.0, "hinge").losses.item() == 0.0


@pytest.mark.parametrize("loss_type", BASIC_DPO_TYPES)
@pytest.mark.parametrize("n", SIZES)
def test_dpo_against_reference(loss_type, n):
    pc, pr = random_sum_logps(n, 1 + n), random_sum_logps(n, 2 + n)
    rc, rr = random_sum_logps(n, 3 + n), random_sum_logps(n, 4 + n)
    # near-equal policy and reference, and huge differences
    pc = torch.cat([pc, torch.tensor([-5.0, -1e-6, -1000.0, -0.0], dtype=f64)])
    pr = torch.cat([pr, torch.tensor([-5.0, -900.0, -1e-6, -50.0], dtype=f64)])
    rc = torch.cat([rc, torch.tensor([-5.0, -800.0, -1e-3, -80.0], dtype=f64)])
    rr = torch.cat([rr, torch.tensor([-5.0 + 1e-9, -1e-3, -700.0, -200.0], dtype=f64)])
    beta, eps = 0.1, (0.2 if loss_type == "robust" else 0.0)
    got, g_got = value_and_grad(lambda *a: dpo_loss(*a, beta, loss_type, eps).losses, pc, pr, rc, rr)
    want, g_want = value_and_grad(lambda *a: dpo_ref(*a, beta, loss_type, eps), pc, pr, rc, rr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the reference gets the opposite gradient of the policy
    torch.testing.assert_close(g_got[2], -g_got[0])
    torch.testing.assert_close(g_got[3], -g_got[1])
    # float32 inputs against the float64 reference
    got32 = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta, loss_type, eps).losses
    want32 = dpo_ref(pc.float().double(), pr.float().double(), rc.float().double(), rr.float().double(), beta, loss_type, eps)
    torch.testing.assert_close(got32.double(), want32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", BASIC_DPO_TYPES)
def test_dpo_gradcheck(loss_type):
    g = torch.Generator().manual_seed(3)
    # h = pc - rc - pr + rr in [-4, 4]; keep away from the hinge kink 1 - beta h = 0 (h = 5)
    xs = [(-torch.rand(5, generator=g, dtype=f64) - 1).requires_grad_(True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, 0.2, loss_type, 0.1).losses, xs)


@pytest.mark.parametrize("loss_type", BASIC_DPO_TYPES)
def test_dpo_at_reference(loss_type):
    """Policy == reference: h = 0, rewards 0; sigmoid and robust give log 2 (any eps:
    ((1 - eps) log 2 - eps log 2) / (1 - 2 eps) = log 2), ipo 1 / (4 beta^2), hinge 1."""
    x = random_sum_logps(31, 5)
    y = random_sum_logps(31, 6)
    beta = 0.3
    out = dpo_loss(x, y, x.clone(), y.clone(), beta, loss_type, 0.25 if loss_type == "robust" else 0.0)
    want = {"sigmoid": math.log(2), "robust": math.log(2), "ipo": 1 / (4 * beta**2), "hinge": 1.0}[loss_type]
    torch.testing.assert_close(out.losses, torch.full_like(x, want), rtol=1e-12, atol=1e-12)
    assert not out.chosen_rewards.any() and not out.rejected_rewards.any()


def test_dpo_rewards_match_docstring():
    # rewards = beta * (log pi - log ref), detached
    pc, pr, rc, rr = (random_sum_logps(47, s).requires_grad_(True) for s in range(4))
    out = dpo_loss(pc, pr, rc, rr, 0.7)
    torch.testing.assert_close(out.chosen_rewards, 0.7 * (pc - rc).detach())
    torch.testing.assert_close(out.rejected_rewards, 0.7 * (pr - rr).detach())
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad and out.losses.shape == (47,)
    assert out.log_odds is None and out.log_odds_ratio is None


def test_dpo_robust_eps0_is_sigmoid():
    pc, pr, rc, rr = (random_sum_logps(123, 10 + s) for s in range(4))
    a = dpo_loss(pc, pr, rc, rr, 0.1, "robust", 0.0).losses
    b = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid").losses
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    # and eps > 0 really changes it
    c = dpo_loss(pc, pr, rc, rr, 0.1, "robust", 0.2).losses
    assert (c - b).abs().max() > 1e-3


def test_dpo_invalid_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, 0.1, "kto")
    for eps in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(x, x, x, x, 0.1, "robust", eps)


# ============================================================================================
# SimPO and CPO


def test_simpo_hand_values():
    # lc = -1, lr = -2, beta 2, gamma 1: z = 2 (-1 - -2) - 1 = 1, loss = log(1 + e^-1)
    out = simpo_loss(torch.tensor([-1.0], dtype=f64), torch.tensor([-2.0], dtype=f64), 2.0, 1.0)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-2.0) and out.rejected_rewards.item() == pytest.approx(-4.0)
    # gamma equal to the reward margin: z = 0, loss log 2
    out = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), 2.0, 2.0)
    assert out.losses.item() == pytest.approx(math.log(2), rel=1e-6)


def test_cpo_hand_values():
    # sc = -5, sr = -5 - log 3, beta 1: z = log 3, loss = -log(3/4) = log(4/3)
    out = cpo_loss(torch.tensor([-5.0], dtype=f64), torch.tensor([-5.0 - math.log(3)], dtype=f64), 1.0)
    assert out.losses.item() == pytest.approx(math.log(4 / 3), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-5.0)
    # beta 0.5, sc = -10, sr = -12: z = 1, loss = log(1 + e^-1)
    out = cpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), 0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(-6.0)


@pytest.mark.parametrize("n", SIZES)
def test_simpo_cpo_against_reference(n):
    lc, lr = _orpo_inputs(n, seed=3 * n)  # averages, with edges
    beta, gamma = 2.5, 1.2
    got, g_got = value_and_grad(lambda a, b: simpo_loss(a, b, beta, gamma).losses, lc, lr)
    want, g_want = value_and_grad(lambda a, b: -log_sigmoid_ref(beta * a - beta * b - gamma), lc, lr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    out = simpo_loss(lc, lr, beta, gamma)
    torch.testing.assert_close(out.chosen_rewards, beta * lc)
    torch.testing.assert_close(out.rejected_rewards, beta * lr)

    sc, sr = random_sum_logps(n, 50 + n, 2000.0), random_sum_logps(n, 60 + n, 2000.0)
    beta = 0.1
    got, g_got = value_and_grad(lambda a, b: cpo_loss(a, b, beta).losses, sc, sr)
    want, g_want = value_and_grad(lambda a, b: -log_sigmoid_ref(beta * a - beta * b), sc, sr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # analytic: dL/dsc = -beta sigma(-z), dL/dsr = +beta sigma(-z)
    s = torch.sigmoid(-(beta * sc - beta * sr))
    torch.testing.assert_close(g_got[0], -beta * s, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(g_got[1], beta * s, rtol=1e-9, atol=1e-15)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    out = cpo_loss(sc, sr, beta)
    torch.testing.assert_close(out.chosen_rewards, beta * sc)
    torch.testing.assert_close(out.rejected_rewards, beta * sr)
    # float32: no overflow for margins of thousands of nats
    out32 = cpo_loss(sc.float(), sr.float(), beta).losses
    torch.testing.assert_close(out32.double(), want, rtol=1e-5, atol=1e-6)


def test_simpo_cpo_gradcheck():
    a = torch.tensor([-0.5, -2.0, -7.0], dtype=f64, requires_grad=True)
    b = torch.tensor([-1.5, -0.1, -7.5], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: simpo_loss(x, y, 2.0, 0.8).losses, (a, b))
    assert torch.autograd.gradcheck(lambda x, y: cpo_loss(x, y, 0.3).losses, (a, b))


def test_rewards_are_detached_and_shapes():
    lc = random_avg_logps(31, 1).requires_grad_(True)
    lr = random_avg_logps(31, 2).requires_grad_(True)
    for out in (orpo_loss(lc, lr, 0.1), simpo_loss(lc, lr, 2.0, 1.0), cpo_loss(lc, lr, 0.1)):
        assert out.losses.shape == (31,) and out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    orpo = orpo_loss(lc, lr, 0.1)
    # ORPO rewards: beta * lc, from the unclamped inputs (TRL's definition)
    torch.testing.assert_close(orpo.chosen_rewards, 0.1 * lc.detach())
    assert not orpo.log_odds.requires_grad and not orpo.log_odds_ratio.requires_grad


def test_slic_hand_values_and_float64_reference():
    # beta 0.5: gap 1 -> 1 - 0.5 = 0.5; gap 2 -> exactly on the margin, 0; gap 4 -> 0; gap -2 -> 2
    chosen = torch.tensor([-10.0, -10.0, -10.0, -12.0], dtype=f64)
    rejected = torch.tensor([-11.0, -12.0, -14.0, -10.0], dtype=f64)
    out = slic_loss(chosen, rejected, 0.5)
    assert out.losses.tolist() == [0.5, 0.0, 0.0, 2.0]
    assert out.chosen_rewards.tolist() == [-5.0, -5.0, -5.0, -6.0]

    # against a plain-Python float64 reference on values and gradients (large summed log-probs)
    for n in SIZES:
        sc, sr = random_sum_logps(n, 70 + n, 2000.0), random_sum_logps(n, 80 + n, 2000.0)
        beta = 0.01
        got, g_got = value_and_grad(lambda a, b: slic_loss(a, b, beta).losses, sc, sr)
        want = [max(0.0, 1.0 - beta * (a - b)) for a, b in zip(sc.tolist(), sr.tolist())]
        # d/da = -beta inside the margin, 0 outside; d/db = +beta inside
        inside = [1.0 - beta * (a - b) > 0 for a, b in zip(sc.tolist(), sr.tolist())]
        assert 0 < sum(inside) < n or n < 5  # both sides of the hinge are exercised
        torch.testing.assert_close(got, torch.tensor(want, dtype=f64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got[0], torch.tensor([-beta if i else 0.0 for i in inside], dtype=f64))
        torch.testing.assert_close(g_got[1], torch.tensor([beta if i else 0.0 for i in inside], dtype=f64))
