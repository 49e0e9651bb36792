"""Dataset mixtures: entry validation, hand-derived sample counts, seeded selection, bad rows
naming their source, eval mixtures, the eval command's selection equal to training's, and a
YAML mixture of three differently shaped datasets that trains with the counts in the card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preftune.commands.train import parse_train_args
from preftune.config import DataArguments
from preftune.data.mixture import DatasetSpec, parse_dataset_entries, sample_counts, select_positions
from preftune.data.splits import EVAL_ID_OFFSET, load_train_eval, prepare_data
from preftune.errors import DataError, PreftuneError

from conftest import tiny_llama


def spec(**kw):
    return DatasetSpec(path=kw.pop("path", "x.jsonl"), **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def three_shapes(tmp_path):
    """Standard JSON lines (24), implicit-prompt CSV with other column names (16), TruthfulQA
    CSV (4 questions x 2 incorrect answers = 8 pairs); all in the demo tokenizer's words."""
    a = write_jsonl(tmp_path / "copy.jsonl", [{"prompt": f"Q: copy {i % 10} {(i * 3) % 10} A:", "chosen": f" {i % 10} {(i * 3) % 10}",
                                               "rejected": f" {(i + 1) % 10} {(i * 3 + 1) % 10}"} for i in range(24)])
    b = tmp_path / "add.csv"
    b.write_text("good,bad\n" + "".join(f"Q: add one to {i % 10} A: {(i + 1) % 10},Q: add one to {i % 10} A: {i % 10}\n" for i in range(16)))
    c = tmp_path / "tqa.csv"
    c.write_text("Question,Best Answer,Incorrect Answers\n" + "".join(f"Q: copy {i} A:,{i},{(i + 1) % 10}; {(i + 2) % 10}\n" for i in range(4)))
    return a, b, c


def test_entries_are_validated_with_fixes():
    base = DatasetSpec("")
    specs = parse_dataset_entries([{"path": "a.jsonl", "weight": 2}, "b.jsonl", {"name": "org/ds", "split": "test", "fraction": 0.5,
                                   "prompt_column": "q", "label": "hub"}], base)
    assert [s.display for s in specs] == ["a.jsonl", "b.jsonl", "hub"] and specs[2].split == "test" and specs[2].columns.prompt == "q"
    assert [s.sampling for s in specs] == ["weight 2", "all", "fraction 0.5"]
    for entries, message in [
        ([{"path": "a", "wieght": 1}], r"unknown key\(s\) 'wieght' \(did you mean 'weight'\?\)"),
        ([{"path": "a", "weight": 1, "num_samples": 3}], "at most one of weight, num_samples, fraction"),
        ([{"split": "train"}], "exactly one of path"),
        ([{"path": "a", "weight": -1}], "weight must be a positive number"),
        ([{"path": "a", "num_samples": 2.5}], "num_samples must be a positive integer"),
        ([{"path": "a", "format": "csv"}], "format must be one of auto, truthfulqa"),
        ([{"path": "a"}, {"path": "a"}], "appears twice"),
        ([], "non-empty list"),
    ]:
        with pytest.raises(PreftuneError, match=message):
            parse_dataset_entries(entries, base)


def test_sample_counts_by_hand():
    # weights 2:1 over 100 and 50 usable examples: T = min(100*3/2, 50*3/1) = 150 -> 100 and 50;
    # num_samples is fixed whatever the weights do
    assert sample_counts([100, 50, 30], [spec(weight=2), spec(weight=1), spec(num_samples=10)]) == [100, 50, 10]
    # equal weights, the small source limits: T = min(100*2, 10*2) = 20 -> 10 and 10
    assert sample_counts([100, 10], [spec(weight=1), spec(weight=1)]) == [10, 10]
    # weights 3:1 over 90 and 90: T = min(90*4/3, 90*4) = 120 -> 90 and 30
    assert sample_counts([90, 90], [spec(weight=3), spec(weight=1)]) == [90, 30]
    # fraction 0.25 of 40 = 10; up-sampling: fraction 2.5 of 4 = 10; no key = all
    assert sample_counts([40, 4, 7], [spec(fraction=0.25), spec(fraction=2.5), spec()]) == [10, 10, 7]


def test_selection_is_seeded_sorted_and_repeats_when_up_sampling():
    a = select_positions(100, 10, seed=1, label="a.jsonl")
    assert np.array_equal(a, select_positions(100, 10, seed=1, label="a.jsonl"))
    assert not np.array_equal(a, select_positions(100, 10, seed=2, label="a.jsonl"))
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0) and a.max() < 100
    up = select_positions(4, 10, seed=1, label="a.jsonl")  # every example twice, then 2 sampled
    assert sorted(np.bincount(up, minlength=4).tolist()) == [2, 2, 3, 3]
    assert np.array_equal(select_positions(5, 5, seed=9, label="z"), np.arange(5))


def data_args(**kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return DataArguments(**kw)


def test_mixture_counts_sampling_and_eval_fraction(three_shapes, demo_tokenizer):
    a, b, c = three_shapes
    entries = [{"path": str(a), "weight": 2}, {"path": str(b), "chosen_column": "good", "rejected_column": "bad", "weight": 1},
               {"path": str(c), "format": "truthfulqa", "num_samples": 5, "label": "truthfulqa"}]
    args = data_args(datasets=entries, eval_fraction=0.2)
    data = prepare_data(demo_tokenizer, args, seed=3)
    # weights 2:1 over 24 and 16: T = min(24*3/2, 16*3) = 36 -> 24 and 12; TruthfulQA: 5 of its 8 pairs.
    # 41 selected, round(41 * 0.2) = 8 held out.
    assert [s["selected"] for s in data.sources] == [24, 12, 5]
    assert len(data.train_pairs) == 33 and len(data.eval_pairs) == 8
    assert [s["train_pairs"] + s["eval_pairs"] for s in data.sources] == [24, 12, 5]
    assert not set(data.train_pairs.example_id.tolist()) & set(data.eval_pairs.example_id.tolist())
    # ids: source bases stacked in order (24 + 16 examples before the TruthfulQA pairs)
    tqa = data.train_pairs.example_id[data.train_pairs.store_index == 2]
    assert tqa.min() >= 40 and tqa.max() < 48
    again = prepare_data(demo_tokenizer, args, seed=3)
    assert again.train_pairs.digest() == data.train_pairs.digest() and all(s["cached"] for s in again.sources)
    other = prepare_data(demo_tokenizer, args, seed=4)
    assert other.train_pairs.digest() != data.train_pairs.digest()
    # the eval command rebuilds the same selection without a tokenizer
    train_ex, eval_ex, _ = load_train_eval(args, seed=3)
    assert sorted(e.example_id for e in eval_ex) == sorted(data.eval_pairs.example_id.tolist())
    assert [e.example_id for e in train_ex] == data.train_pairs.example_id.tolist()


def test_up_sampled_copies_stay_on_one_side_of_the_eval_split(three_shapes, demo_tokenizer):
    a, _, _ = three_shapes
    data = prepare_data(demo_tokenizer, data_args(datasets=[{"path": str(a), "num_samples": 60}], eval_fraction=0.25), seed=0)
    train_ids, eval_ids = data.train_pairs.example_id.tolist(), data.eval_pairs.example_id.tolist()
    copies = np.bincount(select_positions(24, 60, seed=0, label=str(a)), minlength=24)  # 2 or 3 of each
    assert len(eval_ids) == 6 == len(set(eval_ids))  # round(24 unique * 0.25), one pair each
    assert not set(train_ids) & set(eval_ids) and len(set(train_ids) | set(eval_ids)) == 24
    assert len(train_ids) == 60 - copies[eval_ids].sum()  # every copy of a held-out example left training


def test_eval_split_as_its_own_mixture(three_shapes, demo_tokenizer):
    a, b, c = three_shapes
    args = data_args(dataset_name=[str(a)], eval_datasets=[{"path": str(c), "format": "truthfulqa", "num_samples": 3},
                                                           {"path": str(b), "chosen_column": "good", "rejected_column": "bad", "fraction": 0.5}])
    data = prepare_data(demo_tokenizer, args, seed=0)
    assert len(data.train_pairs) == 24 and len(data.eval_pairs) == 3 + 8
    assert data.eval_pairs.example_id.min() >= EVAL_ID_OFFSET
    assert [(s["role"], s["selected"]) for s in data.sources] == [("train", 24), ("eval", 3), ("eval", 8)]


def test_bad_row_names_its_source_dataset_and_line(three_shapes, demo_tokenizer, tmp_path):
    a, _, _ = three_shapes
    bad = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "Q: copy 1 A:", "chosen": " 1", "rejected": " 2"},
                                                 {"prompt": "Q: copy 2 A:", "chosen": "", "rejected": " 3"}])
    entries = [{"path": str(a)}, {"path": str(bad), "label": "extra"}]
    with pytest.raises(DataError, match=r"dataset 'extra', extra.jsonl line 2: empty field: 'chosen' is empty"):
        prepare_data(demo_tokenizer, data_args(datasets=entries), seed=0)
    with pytest.raises(DataError, match=r"dataset 'extra', extra.jsonl line 2: empty field"):
        load_train_eval(data_args(datasets=entries), seed=0)
    data = prepare_data(demo_tokenizer, data_args(datasets=entries, on_bad_row="skip"), seed=0)
    assert [s["bad_rows"] for s in data.sources] == [0, 1] and len(data.train_pairs) == 25


def test_several_dataset_names_and_mixture_flags(three_shapes, tmp_path):
    a, b, _ = three_shapes
    _, args, _ = parse_train_args(["--model_name_or_path", "m", "--dataset_name", str(a), str(b), "--chosen_column", "chosen"])
    assert args.dataset_name == [str(a), str(b)] and [s.path for s in args.sources()] == [str(a), str(b)]
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"- path: {a}\n  weight: 1\n- path: {b}\n  weight: 1\n  chosen_column: good\n  rejected_column: bad\n")
    _, args, _ = parse_train_args(["--model_name_or_path", "m", "--datasets", str(mix)])
    assert [s.weight for s in args.sources()] == [1, 1]
    with pytest.raises(PreftuneError, match="either --dataset_name or datasets:"):
        parse_train_args(["--model_name_or_path", "m", "--dataset_name", str(a), "--datasets", str(mix)])
    with pytest.raises(PreftuneError, match="is a single file, which has no other split"):
        parse_train_args(["--model_name_or_path", "m", "--dataset_name", str(a), "--eval_split", "test"])


def test_yaml_mixture_of_three_shapes_trains_with_counts_in_the_card(three_shapes, tmp_path):
    from preftune.demo import build_demo_tokenizer
    from preftune.run import run_training

    model_dir = tmp_path / "model"
    tok = build_demo_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    a, b, c = three_shapes
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {model_dir}\noutput_dir: {tmp_path / 'run'}\n"
        f"datasets:\n  - path: {a}\n    weight: 2\n  - path: {b}\n    chosen_column: good\n    rejected_column: bad\n    weight: 1\n"
        f"  - path: {c}\n    format: truthfulqa\n    num_samples: 5\n    label: truthfulqa\n"
        "eval_fraction: 0.2\nmax_steps: 16\nlogging_steps: 1\nper_device_train_batch_size: 8\nlearning_rate: 5.0e-3\n"
        "max_length: 64\nmax_prompt_length: 32\nsave_strategy: 'no'\ndisable_tqdm: true\nreport_to: none\n"
    )
    result = run_training(*parse_train_args(["--config", str(cfg)]))
    assert result.train_pairs == 33 and result.eval_pairs == 8
    out = result.output_dir
    config = json.loads((out / "run_config.json").read_text())
    assert [(s["dataset"], s["sampling"], s["selected"]) for s in config["data_sources"]] == [
        (str(a), "weight 2", 24), (str(b), "weight 1", 12), ("truthfulqa", "num_samples 5", 5)]
    assert config["data"]["datasets"][2]["format"] == "truthfulqa"  # the mixture is recorded as given
    card = (out / "README.md").read_text()
    assert f"| `{str(b)}` | train | train | weight 1 | 16 | 0 | 12 |" in card and "| `truthfulqa` | train | train | num_samples 5 | 4 | 0 | 5 |" in card
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) >= 8 and np.mean(losses[-4:]) < np.mean(losses[:4])  # it learned something
    # preftune eval rebuilds the held-out pairs of the mixture from run_config.json
    from preftune.config import DataSourceArguments
    from preftune.evaluation import load_eval_examples

    evals, label = load_eval_examples(DataSourceArguments(), given=set(), run_config=config, model_name=str(out))
    assert len(evals) == 8 and "held out" in label
