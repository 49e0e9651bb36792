"""PreferenceTrainer: gradient accumulation exactness, learning, metrics, non-finite steps."""

from __future__ import annotations

import json
import random

import pytest
import torch

from preftune.config import PreftuneConfig
from preftune.layout import PairTokens
from preftune.outputs import MetricsFileCallback
from preftune.trainer import NonFiniteLossError, PreferenceTrainer

from conftest import FP32, tiny_llama


def random_pairs(n, seed=0, vocab=97):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [PairTokens([1] + tok(rng.randint(1, 9)), tok(rng.randint(1, 7)), tok(rng.randint(1, 7)), i) for i in range(n)]


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                weight_decay=0.0, report_to="none", save_strategy="no", logging_steps=1, seed=7, disable_tqdm=True,
                max_grad_norm=0.0, use_cpu=True)
    base.update(kw)
    return PreftuneConfig(**base)


def train_weights(tmp_path, pairs, **kw):
    model = tiny_llama(seed=3)
    trainer = PreferenceTrainer(model=model, args=make_args(tmp_path, **kw), train_pairs=pairs, pad_token_id=0)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("method,nll_on_prompt,layout", [("orpo", False, "packed"), ("orpo", True, "padded"), ("cpo", True, "packed"), ("simpo", False, "packed")])
def test_gradient_accumulation_equals_large_batch(tmp_path, method, nll_on_prompt, layout):
    pairs = random_pairs(16)
    # fp32: bf16 rounds micro-batches of 2 and batches of 8 differently (2.6e-5 apart, not 1e-6)
    common = dict(method=method, nll_on_prompt=nll_on_prompt, batch_layout=layout, max_steps=2, **FP32)
    big, _ = train_weights(tmp_path / "a", pairs, per_device_train_batch_size=8, gradient_accumulation_steps=1, **common)
    small, _ = train_weights(tmp_path / "b", pairs, per_device_train_batch_size=2, gradient_accumulation_steps=4, **common)
    start = {n: p for n, p in tiny_llama(seed=3).named_parameters()}
    for name in big:
        moved = (big[name] - start[name]).norm()
        assert moved > 0, name
        assert torch.allclose(big[name], small[name], atol=1e-6, rtol=1e-5), (name, (big[name] - small[name]).abs().max())


def test_gradient_accumulation_is_not_mean_of_micro_means(tmp_path):
    # Guard for the test above: the naive rule (average micro-batch token-means) gives a different
    # update when micro-batches hold different token counts, so the equality is not vacuous.
    pairs = random_pairs(8)
    model = tiny_llama(seed=3)
    args = make_args(tmp_path, per_device_train_batch_size=2, nll_on_prompt=True)
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, pad_token_id=0)
    from preftune.engine import sequence_logps
    from preftune.layout import collate_pairs
    from preftune.methods import Hyperparameters, get_method
    from preftune.objective import Window, compute_objective

    micro = [collate_pairs(pairs[i:i + 2], 0, score_prompt=True) for i in range(0, 8, 2)]
    whole = collate_pairs(pairs, 0, score_prompt=True)
    seqs = [sequence_logps(model, b) for b in micro]
    window = Window(pairs=8, nll_tokens=float(whole["num_nll_tokens"]))
    orpo, hp = get_method(args.method), Hyperparameters.from_config(args)
    exact = sum(compute_objective(orpo, hp, s, window).loss for s in seqs)
    full = compute_objective(orpo, hp, sequence_logps(model, whole), Window(8, float(whole["num_nll_tokens"]))).loss
    naive = sum(compute_objective(orpo, hp, s, Window(2, float(b["num_nll_tokens"]))).loss for s, b in zip(seqs, micro)) / 4
    assert torch.allclose(exact, full, atol=1e-5)
    assert abs(naive.item() - full.item()) > 1e-3
    del trainer


def test_end_to_end_margins_rise_and_nll_falls(tmp_path):
    # A learnable preference: chosen completions repeat the last prompt token, rejected ones do not.
    rng = random.Random(0)
    pairs = []
    for i in range(64):
        prompt = [1] + [rng.randrange(3, 97) for _ in range(rng.randint(2, 6))]
        pairs.append(PairTokens(prompt, [prompt[-1], prompt[-1], 2], [rng.randrange(3, 97), rng.randrange(3, 97), 2], i))
    model = tiny_llama(seed=1)
    args = make_args(tmp_path, max_steps=60, learning_rate=3e-3, optim="adamw_torch", per_device_train_batch_size=8, logging_steps=10, beta=0.5)
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, eval_pairs=pairs[:16], pad_token_id=0,
                                callbacks=[MetricsFileCallback(args.output_dir)])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.05
    assert after["eval_nll_loss"] < before["eval_nll_loss"] - 0.5
    assert after["eval_rewards/accuracies"] >= 0.9
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    train_records = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    for key in ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen", "learning_rate", "grad_norm", "tokens_per_second"):
        assert key in train_records[-1], key
    assert train_records[-1]["nll_loss"] < train_records[0]["nll_loss"]


def test_logged_loss_equals_objective(tmp_path):
    # The logged training loss of one step equals the loss computed directly (ORPO = NLL + OR term).
    pairs = random_pairs(4)
    model = tiny_llama(seed=5)
    args = make_args(tmp_path, per_device_train_batch_size=4, learning_rate=0.0, **FP32)  # the expected loss below is an fp32 forward
    from preftune.engine import sequence_logps
    from preftune.layout import collate_pairs
    from preftune.losses import orpo_loss

    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, pad_token_id=0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h][0]
    with torch.no_grad():
        s = sequence_logps(model, collate_pairs(pairs, 0))
        nll = s.nll_sum.sum() / s.nll_count.sum()
        expected = nll + orpo_loss(s.chosen_avg, s.rejected_avg, args.beta).losses.mean()
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert logged["nll_loss"] == pytest.approx(nll.item(), rel=1e-4)


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, monkeypatch):
    pairs = random_pairs(8)
    model = tiny_llama(seed=2)
    args = make_args(tmp_path, per_device_train_batch_size=2, max_steps=4, max_nonfinite_steps=2)
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, pad_token_id=0)
    import preftune.trainer as tr

    real = tr.compute_objective
    calls = {"n": 0}

    def poisoned(*a, **k):
        res = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (2, 3, 4):
            res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(tr, "compute_objective", poisoned)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*example ids"):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # step 1 was applied


def test_every_logged_metric_is_documented():
    from preftune.objective import METRIC_DOCS

    from conftest import REPO

    doc = (REPO / "docs" / "metrics.md").read_text()
    for key in METRIC_DOCS:
        assert f"`{key}`" in doc, key
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "nll_loss", "log_odds_ratio", "log_odds_chosen", "tokens_per_second"):
        assert key in METRIC_DOCS, key
