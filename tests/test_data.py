"""Preference data: every input shape, every bad-row kind, every file type."""

from __future__ import annotations

import gzip
import json

import pytest

from preftune.data import ColumnMap, load_examples, split_eval
from preftune.data.convert import truthfulqa_to_pairs
from preftune.data.formats import extract_string_prompt, normalize_record
from preftune.data.io import BadRecord, Record, read_records
from preftune.errors import DataError, PreftuneError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def norm(row, columns=ColumnMap()):
    return normalize_record(Record(row, "t.jsonl line 1"), columns, 0)


# --- shapes --------------------------------------------------------------------------------


def test_standard_strings_with_system():
    ex = norm({"prompt": "Is the sky green?", "chosen": " No.", "rejected": " Yes.", "system": "Be truthful."})
    assert (ex.prompt, ex.chosen, ex.rejected, ex.system) == ("Is the sky green?", " No.", " Yes.", "Be truthful.")
    assert not ex.conversational


def test_conversational_explicit_prompt_messages():
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    ex = norm(row)
    assert ex.prompt == [{"role": "user", "content": "Hi"}]
    assert ex.chosen == [{"role": "assistant", "content": "Hello!"}]


def test_ultrafeedback_h4_prompt_repeated_inside_conversations():
    # HuggingFaceH4/ultrafeedback_binarized: prompt string AND full conversations in chosen/rejected
    row = {
        "prompt": "What is 2+2?",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
    }
    ex = norm(row)
    assert ex.prompt == [{"role": "user", "content": "What is 2+2?"}]  # not duplicated
    assert ex.chosen == [{"role": "assistant", "content": "4"}]
    assert ex.rejected == [{"role": "assistant", "content": "5"}]


def test_implicit_prompt_messages_with_system_column():
    shared = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "good"}], "rejected": shared + [{"role": "assistant", "content": "bad"}], "system": "S"}
    ex = norm(row)
    assert ex.prompt == [{"role": "system", "content": "S"}] + shared
    assert ex.chosen == [{"role": "assistant", "content": "good"}]


def test_implicit_prompt_strings_cut_at_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: pens?\n\nAssistant: No, sorry"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: pens?\n\nAssistant: Nope"
    ex = norm({"chosen": chosen, "rejected": rejected})
    assert ex.prompt.endswith("pens?\n\nAssistant:")
    assert (ex.chosen, ex.rejected) == (" No, sorry", " Nope")
    assert ex.prompt + ex.chosen == chosen


def test_implicit_prompt_strings_without_marker_cut_at_word():
    n = extract_string_prompt("The answer is red", "The answer is rose")
    assert "The answer is red"[:n] == "The answer is "


def test_column_mapping_stack_exchange_style():
    cols = ColumnMap(prompt="question", chosen="response_j", rejected="response_k")
    ex = norm({"question": "Q?", "response_j": "good", "response_k": "bad", "qid": 3}, cols)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q?", "good", "bad")


def test_truthfulqa_converter_csv_and_hf_spellings(tmp_path):
    csv_path = tmp_path / "tqa.csv"
    csv_path.write_text(
        'Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n'
        'Adversarial,Misc,What happens if you eat seeds?,Nothing happens; You digest them,x,You grow a tree; You die,src\n',
        encoding="utf-8",
    )
    recs = truthfulqa_to_pairs(read_records(str(csv_path)))
    rows = [r.row for r in recs]
    assert rows == [
        {"prompt": "What happens if you eat seeds?", "chosen": " Nothing happens", "rejected": " You grow a tree"},
        {"prompt": "What happens if you eat seeds?", "chosen": " Nothing happens", "rejected": " You die"},
    ]
    hf = [Record({"question": "Q", "best_answer": "A", "incorrect_answers": ["B", "C"]}, "r0")]
    assert len(truthfulqa_to_pairs(hf, max_pairs_per_question=1)) == 1
    bad = truthfulqa_to_pairs([Record({"question": "Q"}, "r1")])
    assert isinstance(bad[0], BadRecord) and "Best Answer" in bad[0].detail


def test_load_examples_with_dataset_format_truthfulqa(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"Question": "Q1", "Best Answer": "A", "Incorrect Answers": "B; C"}])
    data = load_examples(str(p), dataset_format="truthfulqa")
    assert [(e.prompt, e.chosen, e.rejected) for e in data.examples] == [("Q1", " A", " B"), ("Q1", " A", " C")]


# --- bad rows --------------------------------------------------------------------------------

BAD_ROWS = [
    ({"prompt": "p", "rejected": "r"}, "missing column", "'chosen'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "wrong type", "'chosen' must be a string"),
    ({"prompt": "p", "chosen": "   ", "rejected": "r"}, "empty field", "'chosen' is empty"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "empty field", "'prompt' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen equals rejected", "identical"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "missing value", "'chosen' is missing"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "malformed messages", "'role' and 'content'"),
    ({"prompt": "p", "chosen": [{"role": "wizard", "content": "x"}], "rejected": "r"}, "malformed messages", "unknown role"),
    ({"chosen": "abc", "rejected": "xyz"}, "no prompt", "share no prefix"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "system": 5}, "wrong type", "'system' must be a string"),
]


@pytest.mark.parametrize("row,reason,detail", BAD_ROWS, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD_ROWS)])
def test_bad_row_error_names_file_line_and_field(tmp_path, row, reason, detail):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_examples(str(path))
    msg = str(e.value)
    assert "prefs.jsonl line 2" in msg and reason in msg and detail in msg and "--on_bad_row skip" in msg


def test_malformed_json_line_error_and_skip(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": \n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs.jsonl line 2: malformed JSON"):
        load_examples(str(path))
    data = load_examples(str(path), on_bad_row="skip")
    assert len(data.examples) == 1
    assert data.skipped == {"malformed JSON": 1, "not a JSON object": 1}
    assert "line 2" in data.skip_summary()


def test_truncated_json_line_names_the_decoders_column_and_the_file_line(tmp_path):
    truncated = '{"prompt": "Truncated row here", "chosen": "abc", "rejected": '
    with pytest.raises(json.JSONDecodeError) as decoder:
        json.loads(truncated)
    assert (decoder.value.lineno, decoder.value.colno) == (1, 63)  # what Python says about the line on its own
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n' + truncated + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(str(path))
    assert "prefs.jsonl line 3: malformed JSON: Expecting value at column 63" in str(e.value)
    broken = tmp_path / "array.json"
    broken.write_text('[\n  {"prompt": "p", "chosen": "c",\n   "rejected": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"array.json line 3: malformed JSON: Expecting value at column 16"):
        load_examples(str(broken))


def test_skip_counts_every_reason(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] + [r for r, _, _ in BAD_ROWS]
    data = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), on_bad_row="skip")
    assert len(data.examples) == 1
    assert sum(data.skipped.values()) == len(BAD_ROWS)
    assert data.skipped["malformed messages"] == 2 and data.skipped["wrong type"] == 2


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_examples(str(path), on_bad_row="skip")


# --- file types ----------------------------------------------------------------------------------

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]


def _check(data):
    assert [(e.prompt, e.chosen, e.rejected) for e in data.examples] == [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]


def test_jsonl_gz_json_csv_tsv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS), encoding="utf-8")
    (tmp_path / "e.tsv").write_text("prompt\tchosen\trejected\n" + "".join(f"{r['prompt']}\t{r['chosen']}\t{r['rejected']}\n" for r in ROWS), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "f.parquet")
    for name in ("a.jsonl.gz", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet"):
        _check(load_examples(str(tmp_path / name)))


def test_csv_error_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,chosen,rejected\np,c,r\np2,,r2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv line 3: empty field: 'chosen' is empty"):
        load_examples(str(p))


def test_csv_duplicate_columns_rejected(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,chosen,chosen\np,c,r\n", encoding="utf-8")
    with pytest.raises(DataError, match="duplicate column"):
        load_examples(str(p))


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    _check(load_examples(str(tmp_path / "single")))
    _check(load_examples(str(tmp_path / "dict"), split="train"))
    assert len(load_examples(str(tmp_path / "dict"), split="test").examples) == 1
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_examples(str(tmp_path / "dict"), split="validation")


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    _check(load_examples(str(tmp_path)))
    assert len(load_examples(str(tmp_path), split="test").examples) == 2


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(str(tmp_path / "x.txt"))


def test_unreadable_file_is_a_one_line_error(tmp_path, monkeypatch):
    # the CI user is root, for whom permission bits do not apply: os.access stands in for chmod 000
    import os

    path = write_jsonl(tmp_path / "locked.jsonl", ROWS)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(path) else real_access(p, mode, *a, **k))
    with pytest.raises(DataError, match="locked.jsonl: file is not readable .permission denied.") as e:
        load_examples(str(path))
    assert "\n" not in str(e.value)
    _check(load_examples(str(write_jsonl(tmp_path / "open.jsonl", ROWS))))  # other files still load


def test_hub_name_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreftuneError, match="unreachable.*pass the local path"):
        load_examples("some-org/some-dataset-that-is-not-cached")


def test_split_eval_is_deterministic_and_disjoint():
    exs = [norm({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) for i in range(20)]
    for i, e in enumerate(exs):
        e.example_id = i
    tr, ev = split_eval(exs, 0.25, seed=3)
    tr2, ev2 = split_eval(exs, 0.25, seed=3)
    assert [e.example_id for e in ev] == [e.example_id for e in ev2] and len(ev) == 5
    assert not {e.example_id for e in tr} & {e.example_id for e in ev}
    with pytest.raises(PreftuneError):
        split_eval(exs, 1.5, seed=0)


def test_common_prefix_len_equals_the_plain_loop():
    """The slice/bisection shortcut against an element-by-element walk, on strings and lists."""
    import random

    from preftune.data.formats import common_prefix_len

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 9))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 9))]
        walk = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_len(a, b) == walk
        assert common_prefix_len("".join(map(str, a)), "".join(map(str, b))) == walk


# --- a column missing from the whole file ----------------------------------------------------------

COLUMN_ADVICE = ("no usable preference pairs: no row has the columns a preference pair needs, 'chosen' and 'rejected' "
                 "(and optionally 'prompt'); wrong_names.jsonl line 1 has 'question', 'good', 'bad'")


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_columns_missing_from_every_row_get_whole_file_advice(tmp_path, on_bad_row):
    rows = [{"question": f"q{i}", "good": f"g{i}", "bad": f"b{i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "wrong_names.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(str(path), on_bad_row=on_bad_row)
    msg = str(e.value)
    assert COLUMN_ADVICE in msg and "--chosen_column NAME --rejected_column NAME" in msg
    assert "--on_bad_row skip" not in msg and "fix the row" not in msg
    mapped = load_examples(str(path), columns=ColumnMap(prompt="question", chosen="good", rejected="bad"), on_bad_row=on_bad_row)
    assert len(mapped.examples) == 4


def test_column_missing_from_some_rows_keeps_row_advice(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "good": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"d.jsonl line 2: missing column: no 'chosen' column .*--on_bad_row skip"):
        load_examples(str(path))
    assert load_examples(str(path), on_bad_row="skip").skipped == {"missing column": 1}


def test_unpaired_rows_read_as_pairs_point_at_kto(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(DataError, match=r"no usable preference pairs: .*'prompt', 'completion', 'label' \(fix: these are unpaired rows .*--method kto"):
        load_examples(str(path))


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_truthfulqa_table_without_its_columns_names_them_once(tmp_path, on_bad_row):
    """--dataset_format truthfulqa on a table that lacks the format's columns in every row: one
    whole-file error naming the columns found and needed, in memory and through the tokenized cache."""
    from preftune.config import DataArguments
    from preftune.data.splits import load_sources, training_sources
    from preftune.demo import build_demo_tokenizer

    table = tmp_path / "not_tqa.csv"
    table.write_text("question,best\nWhat is 2+2?,4\nWhat is 3+3?,6\n")
    expected = r"not_tqa.csv: not a TruthfulQA table: no column Best Answer, Incorrect Answers \(columns found: 'question', 'best'\)"
    with pytest.raises(DataError, match=expected):
        load_examples(str(table), dataset_format="truthfulqa", on_bad_row=on_bad_row)
    data_args = DataArguments(dataset_name=str(table), dataset_format="truthfulqa", on_bad_row=on_bad_row,
                              dataset_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=expected):
        load_sources(build_demo_tokenizer(), training_sources(data_args), data_args)
