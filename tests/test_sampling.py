"""Token-budget batching (--max_tokens_per_batch)."""

from __future__ import annotations

import random


from preftune.sampling import TokenBudgetBatchSampler, token_budget_batches


def lengths(n=300, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def test_budget_respected_and_every_pair_once():
    ls = lengths() + [500]  # one pair longer than the budget
    s = TokenBudgetBatchSampler(ls, max_tokens=256, seed=1)
    batches = list(s)
    assert len(batches) == len(s)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(ls)))
    for b in batches:
        assert sum(ls[i] for i in b) <= 256 or len(b) == 1
    assert [len(ls)-1] in batches  # the oversized pair alone
    # greedy filling: batches are reasonably full (sorted pools), not one pair each
    assert len(batches) < len(ls) / 2


def test_deterministic_per_epoch_and_reshuffled_across_epochs():
    ls = lengths()
    a, b = TokenBudgetBatchSampler(ls, 256, seed=3), TokenBudgetBatchSampler(ls, 256, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    # the same batches in a new order: every epoch has the same length (what exact resume needs)
    assert sorted(list(a)) == sorted(first) and len(a) == len(first)
    big = lengths(3000)  # several pools
    epochs = []
    for epoch in (0, 1, 2):
        s = TokenBudgetBatchSampler(big, 256, seed=3, num_replicas=2, rank=1)
        s.set_epoch(epoch)
        epochs.append(list(s))
    assert len({len(e) for e in epochs}) == 1 and epochs[0] != epochs[1] != epochs[2]


def test_replicas_disjoint_and_equal():
    ls = lengths(301)
    shards = [list(TokenBudgetBatchSampler(ls, 200, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    ids = [set(i for b in shard for i in b) for shard in shards]
    assert not ids[0] & ids[1]


def test_token_budget_batches_greedy():
    assert token_budget_batches([5, 5, 5, 20, 1], 10, [0, 1, 2, 3, 4]) == [[0, 1], [2], [3], [4]]


def test_trainer_trains_on_the_samplers_batches_and_reshuffles_each_epoch(tmp_path):
    """The micro-batches the trainer computes losses on are exactly the sampler's batches, epoch by
    epoch (the trainer must move the sampler to each new epoch), and respect the token budget."""
    from preftune.config import PreftuneConfig
    from preftune.trainer import PreferenceTrainer
    from test_trainer import random_pairs

    from conftest import tiny_llama

    pairs = random_pairs(40)
    args = PreftuneConfig(output_dir=str(tmp_path), report_to="none", max_tokens_per_batch=60, num_train_epochs=2, disable_tqdm=True,
                          learning_rate=1e-3, save_strategy="no", logging_steps=1, seed=5)
    trainer = PreferenceTrainer(model=tiny_llama(), args=args, train_pairs=pairs, pad_token_id=0)
    trained = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):
        if model.training:
            trained.append(inputs["example_ids"].tolist())
            assert int(inputs["num_tokens"]) <= 60 or int(inputs["num_pairs"]) == 1
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = recording
    trainer.train()
    epochs = []
    for epoch in (0, 1):
        sampler = TokenBudgetBatchSampler([p.packed_length for p in pairs], 60, seed=5)
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert trained == epochs[0] + epochs[1]
    assert epochs[0] != epochs[1]  # a new order in the second epoch (what the trainer must pass on)
    assert sorted(i for b in epochs[0] for i in b) == list(range(40))
    assert trainer.state.global_step == len(trained)


def test_budget_check_names_pairs_over_the_budget_and_refuses_a_budget_below_all():
    import pytest

    from preftune.errors import PreftuneError
    from preftune.sampling import budget_check

    assert budget_check([10, 20, 30], 30) is None  # every pair fits: nothing to say
    note = budget_check([10, 20, 30, 40], 25)
    assert note.startswith("--max_tokens_per_batch 25: 2 of 4 training pairs are longer (packed prompt + completions: shortest 10, longest 40 tokens); "
                           "each of those trains alone, in a batch above the budget. Raise it to at least 40")
    assert "2 of 3 training examples are longer" in budget_check([10, 50, 60], 30, unit="examples")  # the method's unit
    with pytest.raises(PreftuneError, match=r"^--max_tokens_per_batch 5 is below every one of the 3 training pairs \(packed prompt \+ "
                       r"completions: shortest 10, longest 30 tokens\), so no batch could keep to it; raise it to at least 30"):
        budget_check([10, 20, 30], 5)


def test_the_run_says_so_at_start_up(caplog):
    """The data stage of a run (the demo's data: packed pairs of 15 to 23 tokens) names the pairs over
    the budget once, and refuses a budget below them all before any model loads."""
    import logging

    import pytest

    from preftune.config import DataArguments, PreftuneConfig
    from preftune.demo import DemoInputs
    from preftune.errors import PreftuneError
    from preftune.run import prepare_data

    inputs = DemoInputs()
    tokenizer = inputs.load_tokenizer()
    data_args = DataArguments(max_length=32, max_prompt_length=16)

    def config(budget):
        return PreftuneConfig(output_dir="/tmp/unused", use_cpu=True, max_tokens_per_batch=budget)

    with caplog.at_level(logging.WARNING, logger="preftune"):
        data = prepare_data(inputs, tokenizer, data_args, config(20))
    lengths = data.train_pairs.lengths()
    over = int((lengths > 20).sum())
    assert 0 < over < len(lengths)
    notes = [r.getMessage() for r in caplog.records if "--max_tokens_per_batch" in r.getMessage()]
    assert notes == [f"--max_tokens_per_batch 20: {over} of {len(lengths)} training pairs are longer (packed prompt + completions: shortest "
                     f"{lengths.min()}, longest {lengths.max()} tokens); each of those trains alone, in a batch above the budget. Raise it "
                     f"to at least {lengths.max()} to keep every batch within it, or lower --max_length"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preftune"):
        prepare_data(inputs, tokenizer, data_args, config(int(lengths.max())))
    assert not [r for r in caplog.records if "--max_tokens_per_batch" in r.getMessage()]
    with pytest.raises(PreftuneError, match="is below every one of the"):
        prepare_data(inputs, tokenizer, data_args, config(int(lengths.min()) - 1))
