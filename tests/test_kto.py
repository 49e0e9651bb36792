"""KTO: the loss (hand numbers, float64 reference), TRL's class-balance advice, unpaired data
(rows, labels, one-line errors, TRL's unpairing order and KL completions) and the objective."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preftune.data import ColumnMap, load_examples
from preftune.data.formats import PreferenceExample
from preftune.data.io import Record
from preftune.data.tokenize import TokenizeSettings
from preftune.data.unpaired import UNPAIR_BLOCK, UnpairedExample, normalize_unpaired_record, tokenize_unpaired, unpair_examples
from preftune.engine import SequenceLogps
from preftune.errors import DataError
from preftune.losses import class_weight_advice, kl_estimate, kto_loss
from preftune.methods import Hyperparameters, get_method
from preftune.objective import Window, compute_objective

f64 = torch.float64


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_hand_values():
    # log-ratios r = 1 (desirable) and r = -2 (undesirable), KL estimate z = 0.5, beta 0.5:
    # desirable 1 - s(0.5 (1 - 0.5)) = 1 - s(0.25); undesirable 1 - s(0.5 (0.5 + 2)) = 1 - s(1.25)
    logps = torch.tensor([-9.0, -12.0], dtype=f64)
    ref = torch.tensor([-10.0, -10.0], dtype=f64)
    out = kto_loss(logps, ref, torch.tensor([True, False]), 0.5, 0.5, "kto", desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([2 * (1 - sig(0.25)), 0.5 * (1 - sig(1.25))], dtype=f64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.rewards, torch.tensor([0.5, -1.0], dtype=f64))
    # apo_zero_unpaired ignores z: desirable 1 - s(0.5), undesirable s(-1)
    out = kto_loss(logps, ref, torch.tensor([True, False]), 123.0, 0.5, "apo_zero_unpaired")
    torch.testing.assert_close(out.losses, torch.tensor([1 - sig(0.5), sig(-1.0)], dtype=f64), rtol=1e-12, atol=0)
    # z = max(0, mean): log-ratios of the KL completions 1, -3 -> mean -1 -> 0;  3, -1 -> 1
    assert kl_estimate(torch.tensor([1.0, -3.0])).item() == 0.0
    assert kl_estimate(torch.tensor([3.0, -1.0])).item() == 1.0


@pytest.mark.parametrize("n", (3, 47))
@pytest.mark.parametrize("loss_type", ("kto", "apo_zero_unpaired"))
def test_kto_against_float64_reference(n, loss_type):
    g = torch.Generator().manual_seed(n)
    logps = torch.cat([-torch.rand(n, generator=g, dtype=f64) * 200, torch.tensor([-1e-6, -900.0, -5.0], dtype=f64)])
    ref = torch.cat([logps[:n] + torch.randn(n, generator=g, dtype=f64) * 4, torch.tensor([-800.0, -1e-6, -5.0], dtype=f64)])
    desirable = torch.rand(n + 3, generator=g) > 0.4
    z, beta, wd, wu = 0.7, 0.1, 1.0, 1.33
    x = logps.clone().requires_grad_(True)
    out = kto_loss(x, ref, desirable, z, beta, loss_type, wd, wu)
    (g_got,) = torch.autograd.grad(out.losses.sum(), x)
    # reference from the paper / TRL, element by element in float64 Python
    want, g_want = [], []
    for lp, rp, d in zip(logps.tolist(), ref.tolist(), desirable.tolist()):
        r = lp - rp
        if loss_type == "kto":
            arg = beta * (r - z) if d else beta * (z - r)
            value = 1 - sig(arg)
            dv = -sig(arg) * (1 - sig(arg)) * (beta if d else -beta)
        else:
            value = 1 - sig(beta * r) if d else sig(beta * r)
            s = sig(beta * r) * (1 - sig(beta * r)) * beta
            dv = -s if d else s
        w = wd if d else wu
        want.append(w * value)
        g_want.append(w * dv)
    torch.testing.assert_close(out.losses, torch.tensor(want, dtype=f64), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_got, torch.tensor(g_want, dtype=f64), rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(logps, ref, desirable, z, beta, "sigmoid")


def test_class_weight_advice_follows_trl_bounds():
    # 30 desirable, 10 undesirable: lambda_D in [10/30, 1.33 * 10/30] = [0.33, 0.44] or lambda_U in [30/10/1.33, 3] = [2.26, 3.0]
    msg = class_weight_advice(30, 40, 1.0, 1.0)
    assert "[0.33, 0.44]" in msg and "[2.26, 3.0]" in msg and "--desirable_weight" in msg
    assert class_weight_advice(30, 40, 0.4, 1.0) is None and class_weight_advice(30, 40, 1.0, 2.5) is None
    assert class_weight_advice(20, 40, 1.0, 1.0) is None  # balanced


# --------------------------------------------------------------------------------------------
# data


def rec(row, where="d.jsonl line 1"):
    return Record(row, where)


def test_unpaired_rows_and_one_line_errors():
    ok = normalize_unpaired_record(rec({"prompt": "p", "completion": "c", "label": True}), ColumnMap(), 5)
    assert isinstance(ok, UnpairedExample) and ok.label is True and ok.example_id == 5
    csv = normalize_unpaired_record(rec({"prompt": "p", "completion": "c", "label": "False"}), ColumnMap(), 0)
    assert csv.label is False  # CSV cells
    msgs = [normalize_unpaired_record(rec({"prompt": "p", "completion": "c", "label": 1}), ColumnMap(), 0),
            normalize_unpaired_record(rec({"prompt": "p", "completion": "c"}), ColumnMap(), 0),
            normalize_unpaired_record(rec({"prompt": "p", "completion": "", "label": True}), ColumnMap(), 0),
            normalize_unpaired_record(rec({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}], "label": True}), ColumnMap(), 0)]
    assert [m.reason for m in msgs] == ["wrong type", "missing column", "empty field", "malformed messages"]
    assert "'label' must be true or false, got 1 (int)" in msgs[0].detail
    assert "--label_column" in msgs[1].detail
    conv = normalize_unpaired_record(rec({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}], "label": False}),
                                     ColumnMap(), 0)
    assert conv.completion == [{"role": "assistant", "content": "a"}]


def test_load_unpaired_file_errors_name_the_row(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n" + json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"kto.jsonl line 2: wrong type: 'label' must be true or false, got 'yes'"):
        load_examples(str(path), unpaired=True)
    assert len(load_examples(str(path), unpaired=True, on_bad_row="skip").examples) == 1
    # unpaired rows given to a paired method: the message says which method reads them
    with pytest.raises(DataError, match="train on unpaired data with --method kto"):
        load_examples(str(path))


def test_unpairing_follows_trl_block_order():
    pairs = [PreferenceExample(f"p{i}", f"c{i}", f"r{i}", None, f"row {i}", i) for i in range(UNPAIR_BLOCK + 2)]
    out = unpair_examples(pairs)
    # first block: its 1000 chosen, then its 1000 rejected; then the 2 left over, chosen first
    want = [("c", i) for i in range(UNPAIR_BLOCK)] + [("r", i) for i in range(UNPAIR_BLOCK)] + [("c", 1000), ("c", 1001), ("r", 1000), ("r", 1001)]
    assert [(e.completion[0], int(e.completion[1:])) for e in out] == want
    assert [e.label for e in out[:3]] == [True] * 3 and out[UNPAIR_BLOCK].label is False
    assert out[0].example_id == 0 and out[UNPAIR_BLOCK].example_id == 1 and len({e.example_id for e in out}) == len(out)


def test_kl_completions_rotate_within_each_batch(demo_tokenizer):
    # 5 examples in groups of 2: (x1,y2) (x2,y1) | (x3,y4) (x4,y3) | (x5,y5) -- TRL's rule
    rows = [UnpairedExample(f"Q: copy {d} A:", f" {d}", i % 2 == 0, None, f"row {i}", i) for i, d in enumerate("12345")]
    toks, _ = tokenize_unpaired(demo_tokenizer, rows, TokenizeSettings(), kl_group=2)
    completion = {p.example_id: p.chosen for p in toks}
    assert [p.rejected for p in toks] == [completion[1], completion[0], completion[3], completion[2], completion[4]]
    assert [p.label for p in toks] == [True, False, True, False, True]
    # no KL completions for losses without the KL term; truncation cuts completion and KL completion alike
    assert all(p.rejected == [] for p in tokenize_unpaired(demo_tokenizer, rows, TokenizeSettings(), kl_group=None)[0])
    short, report = tokenize_unpaired(demo_tokenizer, rows, TokenizeSettings(max_length=6, max_prompt_length=None), kl_group=2)
    assert all(len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 6 for p in short) and report.completion_truncated == 5


# --------------------------------------------------------------------------------------------
# objective


def test_kto_objective_and_metrics():
    """Completion log-ratios (1, -2, 0.5), KL log-ratios (0.4, 0.2, 0.6) -> z = 0.4; labels (T, F, T)."""
    seq = SequenceLogps(
        chosen_sum=torch.tensor([-9.0, -12.0, -4.5], dtype=f64), rejected_sum=torch.tensor([-5.6, -7.8, -3.4], dtype=f64),
        chosen_count=torch.ones(3, dtype=f64), rejected_count=torch.ones(3, dtype=f64),
        nll_sum=torch.ones(3, dtype=f64), nll_count=torch.ones(3, dtype=f64))
    ref = (torch.tensor([-10.0, -10.0, -5.0], dtype=f64), torch.tensor([-6.0, -8.0, -4.0], dtype=f64))
    desirable = torch.tensor([True, False, True])
    hp = Hyperparameters(beta=0.5, loss_type=("kto",), undesirable_weight=2.0)
    res = compute_objective(get_method("kto"), hp, seq, Window(pairs=3, nll_tokens=3), ref=ref, desirable=desirable)
    z = 0.4
    want = ((1 - sig(0.5 * (1 - z))) + 2 * (1 - sig(0.5 * (z + 2))) + (1 - sig(0.5 * (0.5 - z)))) / 3
    assert res.loss.item() == pytest.approx(want, rel=1e-12)
    m = res.metric_sums
    assert m["rewards/chosen"] == pytest.approx((0.5 * 1 + 0.5 * 0.5, 2)) and m["rewards/rejected"] == pytest.approx((-1.0, 1))
    assert m["logps/chosen"] == pytest.approx((-13.5, 2)) and m["kl"] == pytest.approx((z * 3, 3))
    assert get_method("kto").derived_metrics({"rewards/chosen": 0.375, "rewards/rejected": -1.0}) == {"rewards/margins": 1.375}
