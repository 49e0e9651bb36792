"""``preftune data inspect``: hand-derived lengths, bad rows, over-long pairs, the same numbers
as the training data stage, the command line (text and --json) and its one-line errors."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.config import DataArguments
from preftune.data.inspect import inspect_data
from preftune.data.splits import prepare_data
from preftune.errors import DataError

REQUIRED_KEYS = {"rows", "pairs", "bad_rows", "prompt_tokens", "chosen_tokens", "rejected_tokens", "truncated", "dropped", "suggested_max_length"}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def lengths_file(tmp_path):
    """Ten pairs whose token counts (demo tokenizer: one token per word, BOS + prompt, answer +
    EOS) are known: row i has a prompt of i + 5 tokens, chosen i + 2, rejected 2; plus one bad row."""
    rows = [{"prompt": "Q: copy" + " 2" * (i + 1) + " A:", "chosen": " 2" * (i + 1), "rejected": " 1"} for i in range(10)]
    rows.insert(4, {"prompt": "Q: copy 1 A:", "chosen": "", "rejected": " 1"})
    return write_rows(tmp_path / "lengths.jsonl", rows)


@pytest.fixture
def tokenizer_dir(tmp_path, demo_tokenizer):
    demo_tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_lengths_truncation_and_suggestion_by_hand(lengths_file, demo_tokenizer):
    args = DataArguments(dataset_name=[str(lengths_file)], max_length=12, max_prompt_length=None, on_bad_row="skip")
    report = inspect_data(demo_tokenizer, args)
    assert REQUIRED_KEYS <= set(report)
    assert report["rows"] == 11 and report["pairs"] == 10 and report["bad_rows"] == {"empty field": 1}
    assert report["format"] == "standard"
    # inverted-CDF percentiles of 10 values: p50 = 5th smallest, p90 = 9th, p99 = 10th
    assert report["prompt_tokens"] == {"p50": 9, "p90": 13, "p99": 14, "max": 14}  # prompts 5..14
    assert report["chosen_tokens"] == {"p50": 6, "p90": 10, "p99": 11, "max": 11}  # chosen 2..11
    assert report["rejected_tokens"] == {"p50": 2, "p90": 2, "p99": 2, "max": 2}
    # max_length 12: room 12 - (i + 5) = 7 - i; i >= 7 has none (3 dropped), i = 3..6 cut the chosen (4 truncated)
    assert report["dropped"] == 3 and report["truncated"] == 4
    # whole pair needs (i + 5) + (i + 2) = 2i + 7 tokens: 25 keeps all ten
    assert report["suggested_max_length"] == 25 and report["suggested_max_prompt_length"] == 14
    ex = report["example"]
    assert ex["where"] == "lengths.jsonl line 1" and ex["prompt"] == "<s> Q: copy 2 A:" and ex["chosen"] == "2 </s>"


def test_inspect_counts_equal_the_training_data_stage(lengths_file, demo_tokenizer):
    for max_length, max_prompt_length in ((12, None), (14, 8), (64, 6)):
        args = DataArguments(dataset_name=[str(lengths_file)], max_length=max_length, max_prompt_length=max_prompt_length, on_bad_row="skip")
        report = inspect_data(demo_tokenizer, args)
        data = prepare_data(demo_tokenizer, args, seed=42)
        stage = data.train_report
        assert report["dropped"] == sum(stage.dropped.values())
        assert len(data.train_pairs) == report["pairs"] - report["dropped"]
        cut = sum(1 for p, whole in zip(data.train_pairs, _whole_lengths(demo_tokenizer, args, data)) if p.packed_length < whole)
        assert report["truncated"] == cut


def _whole_lengths(tokenizer, args, data):
    import dataclasses

    full = prepare_data(tokenizer, dataclasses.replace(args, max_length=None, max_prompt_length=None), seed=42)
    by_id = dict(zip(full.train_pairs.example_id.tolist(), full.train_pairs.lengths().tolist()))
    return [by_id[i] for i in data.train_pairs.example_id.tolist()]


def test_without_a_tokenizer_rows_and_bad_rows_only(lengths_file):
    report = inspect_data(None, DataArguments(dataset_name=[str(lengths_file)]))
    assert report["rows"] == 11 and report["bad_rows"] == {"empty field": 1} and report["pairs"] == 10
    assert report["prompt_tokens"] is None and report["suggested_max_length"] is None


def test_command_line_json_text_and_errors(lengths_file, tokenizer_dir, capsys):
    assert main(["data", "inspect", str(lengths_file), "--model_name_or_path", str(tokenizer_dir), "--max_length", "12",
                 "--max_prompt_length", "64", "--json"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.endswith("}\n")  # one JSON document, newline-terminated: a following stderr line starts a line of its own
    out = json.loads(stdout)
    assert REQUIRED_KEYS <= set(out) and out["dropped"] == 3 and out["bad_rows"] == {"empty field": 1}
    assert main(["data", "inspect", str(lengths_file), "--model_name_or_path", str(tokenizer_dir)]) == 0
    text = capsys.readouterr().out
    assert "rows read" in text and "1 empty field" in text and "suggested max_length  25" in text
    assert "<s> Q: copy 2 A:\u27e62 </s>\u27e7" in text  # the boundary, marked
    assert main(["data", "inspekt", str(lengths_file)]) == 2
    assert "unknown `preftune data` subcommand 'inspekt'" in capsys.readouterr().err
    assert main(["data", "inspect", str(lengths_file), "--max_length", "1"]) == 2
    assert "--max_length must be at least 2" in capsys.readouterr().err
    assert main(["data", "inspect", str(lengths_file.with_name("missing.jsonl"))]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_config_file_mixture_is_inspected(lengths_file, tokenizer_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tokenizer_dir}\nlearning_rate: 1.0e-4\ndatasets:\n  - path: {lengths_file}\n    num_samples: 4\n"
                   "on_bad_row: skip\n")
    assert main(["data", "inspect", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pairs"] == 4 and out["sources"][0]["selected"] == 4 and out["sources"][0]["sampling"] == "num_samples 4"


def test_bad_rows_are_listed_one_by_one_then_counted(tmp_path, capsys):
    good = {"prompt": "Q: copy 1 A:", "chosen": " 1", "rejected": " 2"}
    lines = [json.dumps(good), '{"prompt": "Q: copy 1 A:", "chosen": " 1", "rejected": ']
    lines += [json.dumps({**good, "chosen": ""})] * 24  # lines 3..26
    path = tmp_path / "listed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = inspect_data(None, DataArguments(dataset_name=[str(path)]))
    assert report["bad_rows"] == {"empty field": 24, "malformed JSON": 1}
    assert report["first_bad_rows"][:2] == [
        {"where": "listed.jsonl line 2", "reason": "malformed JSON", "detail": "Expecting value at column 56"},
        {"where": "listed.jsonl line 3", "reason": "empty field", "detail": "'chosen' is empty"},
    ]
    assert len(report["first_bad_rows"]) == 20 and report["first_bad_rows"][-1]["where"] == "listed.jsonl line 21"
    assert report["more_bad_rows"] == 5
    assert main(["data", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "    listed.jsonl line 2: malformed JSON: Expecting value at column 56\n" in text
    assert "    listed.jsonl line 21: empty field: 'chosen' is empty\n    and 5 more\n" in text
    assert "listed.jsonl line 22" not in text


def test_token_length_hint_only_without_a_tokenizer(tmp_path, tokenizer_dir, capsys):
    rows = [{"prompt": [{"role": "user", "content": "Q: copy 2 A:"}], "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "1"}]}] * 3
    path = write_rows(tmp_path / "conversation.jsonl", rows)
    assert main(["data", "inspect", str(path), "--model_name_or_path", str(tokenizer_dir), "--chat_template", "never"]) == 0
    text = capsys.readouterr().out
    assert "pass --model_name_or_path" not in text
    assert "(no token lengths: no usable pairs (bad rows: 3 needs a chat template))" in text
    assert main(["data", "inspect", str(path)]) == 0
    assert "(pass --model_name_or_path for token lengths, truncation and an example)" in capsys.readouterr().out


def test_columns_missing_from_every_row_get_whole_file_advice(tmp_path, demo_tokenizer, capsys):
    rows = [{"question": "Q: copy 1 A:", "good": " 1", "bad": " 2"}] * 3
    path = write_rows(tmp_path / "wrong_names.jsonl", rows)
    whole_file = ("wrong_names.jsonl: no usable preference pairs: no row has the columns a preference pair needs, 'chosen' and "
                  "'rejected' (and optionally 'prompt'); wrong_names.jsonl line 1 has 'question', 'good', 'bad'")
    for on_bad_row in ("error", "skip"):  # training, either policy
        with pytest.raises(DataError) as e:
            prepare_data(demo_tokenizer, DataArguments(dataset_name=[str(path)], on_bad_row=on_bad_row), seed=42)
        assert whole_file in str(e.value) and "--chosen_column NAME" in str(e.value) and "--on_bad_row skip" not in str(e.value)
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert whole_file in err and "--on_bad_row skip" not in err
    assert main(["data", "inspect", str(path), "--prompt_column", "question", "--chosen_column", "good", "--rejected_column", "bad",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 3


def test_usage_shows_the_options_inspect_takes(capsys):
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.startswith("usage: preftune data inspect DATA [DATA ...] [--model_name_or_path M] [--json] [data options]\n")
    assert "--config RUN.yaml" in usage and "--max_length N" in usage and "--chat_template auto|always|never" in usage
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--max_length"])  # argparse's own error repeats the usage: a few lines, not thirty
    err = capsys.readouterr().err
    assert err.startswith("usage: preftune data inspect DATA") and len(err.splitlines()) <= 5
    assert main(["data"]) == 2
    assert capsys.readouterr().out.startswith("usage: preftune data inspect DATA [DATA ...]")


def test_on_bad_row_is_honoured_as_training_would(lengths_file, tmp_path, capsys):
    """Inspect always reports every bad row and says what training does about them; --on_bad_row error
    (a flag or the config's key) then ends it with the very error `preftune train` stops with."""
    with pytest.raises(DataError) as training:
        prepare_data(None, DataArguments(dataset_name=[str(lengths_file)], on_bad_row="error"), seed=42)
    assert str(training.value) == "lengths.jsonl line 5: empty field: 'chosen' is empty (fix: fix the row, or pass --on_bad_row skip to skip bad rows)"
    assert main(["data", "inspect", str(lengths_file)]) == 0  # not asked: the report only
    out = capsys.readouterr().out
    assert "    preftune train stops at the first of them (--on_bad_row error); fix them, or pass --on_bad_row skip to train without them\n" in out
    assert main(["data", "inspect", str(lengths_file), "--on_bad_row", "skip"]) == 0
    assert "    preftune train skips them (--on_bad_row skip)\n" in capsys.readouterr().out
    assert main(["data", "inspect", str(lengths_file), "--on_bad_row", "error", "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the whole report first
    assert report["on_bad_row"] == "error" and report["bad_row_error"] == str(training.value) and report["pairs"] == 10
    assert captured.err.strip().splitlines()[-1] == f"preftune: error: {training.value}"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"dataset_name: {lengths_file}\non_bad_row: error\n")
    assert main(["data", "inspect", "--config", str(cfg)]) == 2
    assert f"preftune: error: {training.value}" in capsys.readouterr().err
    clean = write_rows(tmp_path / "clean.jsonl", [{"prompt": "Q: copy 1 A:", "chosen": " 1", "rejected": " 2"}])
    assert main(["data", "inspect", str(clean), "--on_bad_row", "error"]) == 0  # nothing to stop at
    assert inspect_data(None, DataArguments(dataset_name=[str(clean)]))["bad_row_error"] is None


def test_data_on_the_command_line_replaces_the_configs_and_config_mistakes_name_the_file(lengths_file, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("datasets: [{path: elsewhere.jsonl, weight: 1}]\nlearning_rate: 1.0e-4\n")
    assert main(["data", "inspect", str(lengths_file), "--config", str(cfg), "--on_bad_row", "skip", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sources"][0]["dataset"] == str(lengths_file)
    assert f"preftune: DATA on the command line replaces datasets: of --config {str(cfg)!r}" in captured.err
    cfg.write_text(f"datasets: [{{path: {lengths_file}, wieght: 1}}]\n")
    assert main(["data", "inspect", "--config", str(cfg)]) == 2
    assert (f"preftune: error: --config {str(cfg)!r}: datasets entry 1 of 1: unknown key(s) 'wieght' (did you mean 'weight'?)"
            in capsys.readouterr().err)
    cfg.write_text(f"dataset_name: {lengths_file}\nmax_length: long\nlearnig_rate: 1\n")
    assert main(["data", "inspect", "--config", str(cfg)]) == 2
    assert f"--config {str(cfg)!r}: unknown option(s) 'learnig_rate' (did you mean 'learning_rate'?)" in capsys.readouterr().err
    cfg.write_text(f"dataset_name: {lengths_file}\nmax_length: long\n")
    assert main(["data", "inspect", "--config", str(cfg)]) == 2
    assert f"--config {str(cfg)!r}: max_length: 'long' is not an integer" in capsys.readouterr().err
