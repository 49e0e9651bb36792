"""Hostile input: property-based tests over the data pipeline and the CLI.

Every case must end in a usable result, a counted skip, or a clear one-line error (DataError /
PreftuneError, exit code 2 from the CLI) — never another exception or a traceback — and must
not damage anything already on disk. docs/reliability.md records how many inputs these try.

Strategies generate inputs that reach the code under test (no early returns), and each property
labels what an input led to with hypothesis' ``event``; ``pytest tests/test_hostile.py
--hypothesis-show-statistics`` prints how many inputs ended where (the counts in
docs/reliability.md come from there).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from preftune.cli import main
from preftune.data import ColumnMap, load_examples
from preftune.data.formats import BadRow, PreferenceExample, normalize_record
from preftune.data.io import Record
from preftune.data.tokenize import TokenizeSettings, tokenize_examples
from preftune.errors import PreftuneError

EXAMPLES = int(os.environ.get("PREFTUNE_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

KNOWN_REASONS = {"missing column", "wrong type", "empty field", "missing value", "chosen equals rejected", "malformed messages", "no prompt"}

# any unicode, control characters and surrogate-free code points included
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": st.one_of(texts, st.integers())}), max_size=4)
values = st.one_of(texts, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(), messages, st.lists(texts, max_size=3), st.dictionaries(texts, texts, max_size=2))
# Text that is not blank, built so (no filter that throws inputs away): a first character that is
# neither whitespace nor a control character, then any text.
good_text = st.builds(str.__add__, st.characters(blacklist_categories=("Cs", "Cc", "Z")), texts)


def _distinct(row: dict) -> dict:
    """Make chosen differ from rejected (hypothesis likes to draw equal strings)."""
    return row if row["chosen"] != row["rejected"] else {**row, "rejected": row["rejected"] + " (other)"}


# rows a reader must accept: three non-blank, distinct strings
good_rows = st.fixed_dictionaries({"prompt": good_text, "chosen": good_text, "rejected": good_text}).map(_distinct)
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": good_text}), min_size=1, max_size=3)
# any keys (most rows miss a column), and rows with both completion columns holding hostile or
# plausible values (strings, message lists), which reach the type, emptiness, prompt-extraction
# and message checks
any_rows = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "system", "extra", ""]), values, max_size=5)
field = st.one_of(good_text, good_messages, values)
paired_rows = st.fixed_dictionaries({"chosen": field, "rejected": field}, optional={"prompt": field, "system": st.one_of(good_text, values)})
rows = st.one_of(any_rows, paired_rows, good_rows)


def outcome(error: PreftuneError) -> str:
    """A short label of an error for hypothesis' statistics ("malformed JSON", "not valid UTF-8 text", ...)."""
    problem = getattr(error, "problem", str(error))
    return re.split(r"[:(]", problem)[0].strip()


@SETTINGS
@given(rows)
def test_normalize_never_crashes(row):
    result = normalize_record(Record(row, "f.jsonl line 1"), ColumnMap(), 0)
    if isinstance(result, BadRow):
        event(f"bad row: {result.reason}")
        assert result.reason in KNOWN_REASONS, result
        assert result.where == "f.jsonl line 1" and result.detail
    else:
        event("valid pair")
        assert isinstance(result, PreferenceExample)
        for part in (result.prompt, result.chosen, result.rejected):
            assert part  # never an empty prompt or completion
        assert result.chosen != result.rejected


def _jsonl(lines: list[str]) -> bytes:
    return "".join(line.replace("\n", " ").replace("\r", " ") + "\n" for line in lines).encode("utf-8", "surrogatepass")


def _csv(table: list[list[str]]) -> bytes:
    return "".join(",".join(cells) + "\n" for cells in table).encode("utf-8", "surrogatepass")


jsonl_bytes = st.lists(st.one_of(rows.map(json.dumps), good_rows.map(json.dumps), texts), min_size=1, max_size=6).map(_jsonl)
json_bytes = st.one_of(st.lists(st.one_of(rows, good_rows, values), max_size=5), st.dictionaries(texts, values, max_size=3)).map(
    lambda obj: json.dumps(obj).encode("utf-8"))
COLUMNS = ["prompt", "chosen", "rejected", "system", "extra"]
csv_header = st.one_of(st.just(["prompt", "chosen", "rejected"]), st.lists(st.one_of(st.sampled_from(COLUMNS), texts), max_size=4))
csv_cell = st.one_of(good_text, texts, st.sampled_from(['"', '""', "a,b", '"x,y"', "\r"]))
csv_bytes = st.tuples(csv_header, st.lists(st.lists(csv_cell, min_size=2, max_size=4), max_size=5)).map(lambda t: _csv([t[0], *t[1]]))


@st.composite
def parquet_bytes(draw):
    """A real Parquet file: columns of one type each (strings, numbers, None, lists), 0-4 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = draw(st.one_of(st.just(["prompt", "chosen", "rejected"]), st.lists(st.sampled_from(COLUMNS), unique=True, max_size=4)))
    n = draw(st.integers(0, 4))
    kinds = {"text": st.one_of(good_text, texts), "int": st.integers(-5, 5), "float": st.floats(allow_nan=True), "list": st.lists(texts, max_size=2)}
    columns = {}
    for name in names:
        kind = kinds[draw(st.sampled_from(["text"] * 5 + ["int", "float", "list"]))]
        columns[name] = draw(st.lists(st.one_of(kind, kind, kind, st.none()), min_size=n, max_size=n))
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns) if columns else pa.table({"x": []}), buffer)
    return buffer.getvalue()


# Per file type: arbitrary bytes (they stop at decoding) or content that reaches the parser and
# the row checks (JSON lines, JSON documents, CSV tables, gzip of JSON lines, real Parquet files).
FILE_CONTENTS = {
    "d.jsonl": st.one_of(st.binary(max_size=400), jsonl_bytes),
    "d.json": st.one_of(st.binary(max_size=400), json_bytes),
    "d.csv": st.one_of(st.binary(max_size=400), csv_bytes),
    "d.jsonl.gz": st.one_of(st.binary(max_size=400), jsonl_bytes.map(gzip.compress)),
    "d.parquet": st.one_of(st.binary(max_size=400), parquet_bytes()),
}


@pytest.mark.parametrize("name", sorted(FILE_CONTENTS))
@SETTINGS
@given(data=st.data())
def test_hostile_files_load_or_fail_in_one_line(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data.draw(FILE_CONTENTS[name], label="file bytes"))
    try:
        loaded = load_examples(str(path), on_bad_row="skip")
    except PreftuneError as e:  # DataError included
        event(f"error: {outcome(e)}")
        assert "\n" not in str(e).strip() and str(e)
    else:
        event("loaded pairs" + (" (some rows skipped)" if loaded.skipped else ""))
        assert loaded.examples and all(isinstance(ex, PreferenceExample) for ex in loaded.examples)


@SETTINGS
@given(st.lists(st.one_of(rows.map(json.dumps), good_rows.map(json.dumps), texts), min_size=1, max_size=8))
def test_jsonl_lines_error_names_line(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(_jsonl(lines))
    try:
        data = load_examples(str(path))
    except PreftuneError as e:
        event(f"error: {outcome(e)}")
        msg = str(e)
        assert "prefs.jsonl" in msg
        assert " line " in msg or "no usable" in msg
    else:
        event("loaded pairs")
        assert data.examples and all(isinstance(ex, PreferenceExample) for ex in data.examples)


@pytest.fixture(scope="module")
def llama_or_demo_tokenizer():
    from conftest import LLAMA2_TOKENIZER

    if LLAMA2_TOKENIZER.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(LLAMA2_TOKENIZER))
    from preftune.demo import build_demo_tokenizer

    return build_demo_tokenizer()


@SETTINGS
@given(good_rows, st.integers(2, 80), st.integers(1, 40), st.sampled_from(["keep_end", "keep_start"]))
def test_tokenize_arbitrary_unicode_respects_limits(llama_or_demo_tokenizer, raw, max_length, max_prompt, mode):
    row = normalize_record(Record(raw, "r"), ColumnMap(), 0)
    assert isinstance(row, PreferenceExample), row  # every generated row is valid: all of them reach the tokenizer
    pairs, report = tokenize_examples(llama_or_demo_tokenizer, [row], TokenizeSettings(max_length=max_length, max_prompt_length=max_prompt, truncation_mode=mode))
    assert len(pairs) + sum(report.dropped.values()) == 1
    if not pairs:
        event(f"dropped: {next(reason for reason, n in report.dropped.items() if n)}")
    for p in pairs:
        event("kept" + (", prompt truncated" if report.prompt_truncated else "") + (", completion truncated" if report.completion_truncated else ""))
        assert 1 <= len(p.prompt) <= max_prompt
        assert len(p.chosen) >= 1 and len(p.rejected) >= 1
        assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= max_length
        assert p.chosen != p.rejected


def test_huge_field_is_truncated_not_fatal(tmp_path, llama_or_demo_tokenizer):
    big = "word " * 200_000  # 1 MB
    path = tmp_path / "big.jsonl"
    # " 1" and " 2" are words of both tokenizers (the demo one maps "yes" and "no" both to <unk>)
    path.write_text(json.dumps({"prompt": big, "chosen": " 1", "rejected": " 2"}) + "\n" + json.dumps({"prompt": "p", "chosen": big, "rejected": " 2"}) + "\n")
    data = load_examples(str(path))
    pairs, report = tokenize_examples(llama_or_demo_tokenizer, data.examples, TokenizeSettings(max_length=64, max_prompt_length=32))
    assert len(pairs) == 2 and report.prompt_truncated == 1 and report.completion_truncated == 1
    assert all(len(p.prompt) + len(p.chosen) <= 64 for p in pairs)


def test_duplicate_json_keys_are_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c", "chosen": "x", "rejected": "r"}\n')
    with pytest.raises(PreftuneError, match="d.jsonl line 2: duplicate column"):
        load_examples(str(path))
    assert len(load_examples(str(path), on_bad_row="skip").examples) == 1


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# Each flag with values that parse (first) and values that must be refused; raw tokens mixed in.
FLAG_VALUES = {
    "--output_dir": ["preftune-demo", "out", "../..", "/dev/null", "", "\x00"],
    "--model_name_or_path": ["some-org/model", "../..", "", "\x00"],
    "--dataset_name": ["train.jsonl", "missing.jsonl", "🤖", "\x00"],
    "--max_steps": ["3", "-1", "abc", "1e309"],
    "--beta": ["0.1", "-1", "nan", "1e309"],
    "--method": ["orpo", "dpo", "ppo"],
    "--on_bad_row": ["skip", "error", "ignore"],
    "--max_length": ["64", "0", "abc"],
    "--eval_fraction": ["0.25", "1.5", "nan"],
    "--batch_layout": ["padded", "diagonal"],
    "--selective_checkpointing": ["mlp", "layers"],
    "--truncation_mode": ["keep_start", "middle"],
    "--learning_rate": ["1e-4", "abc"],
    "--nll_on_prompt": ["true", "yes", "maybe"],
    "--config": ["/dev/null", "missing.yaml"],
    "--resume_from_checkpoint": ["latest", "../.."],
    "--overwrite_output_dir": ["true", "false"],
}
RAW_TOKENS = ["-1", "abc", "", "🤖", "\x00", "--", "-", "--help-me", "--overwrite_output_dir", "latest"]
flag_and_value = st.sampled_from(sorted(FLAG_VALUES)).flatmap(lambda flag: st.tuples(st.just(flag), st.sampled_from(FLAG_VALUES[flag])))
argv_strategy = st.lists(st.one_of(flag_and_value, flag_and_value, flag_and_value, st.sampled_from(RAW_TOKENS).map(lambda t: (t,))), max_size=4).map(
    lambda parts: [token for part in parts for token in part])


@settings(max_examples=max(EXAMPLES // 2, 20), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv_strategy)
def test_cli_argv_fuzz_never_tracebacks(tmp_path, monkeypatch, argv):
    """Random flags: exit 0 or 2 with a one-line message, never an uncaught exception; nothing
    before training writes into the finished run already in the working folder; a run aimed at
    it stops with "already holds a finished run" unless --overwrite_output_dir or a resume.

    Parsing, validation, the output-folder checks and data loading are real; the training itself
    is replaced by a stub (real runs are covered in test_cli.py and test_reliability.py).
    """
    import preftune.run as run
    from preftune.data.splits import load_train_eval
    from preftune.rundir import check_output_dir

    reached = []

    def validate_only(model_args, data_args, args, command=None):
        reached.append(args)
        out = check_output_dir(args.output_dir, args.overwrite_output_dir, bool(args.resume_from_checkpoint), model_args.is_demo)
        if data_args.has_data:  # the examples the data stage would select, sources and eval split as given
            load_train_eval(data_args, args.seed)
        return run.RunResult(out, {}, 0, 0, 0.0)

    monkeypatch.setattr(run, "run_training", validate_only)
    monkeypatch.chdir(tmp_path)
    finished = tmp_path / "preftune-demo"
    finished.mkdir(exist_ok=True)
    (finished / "run_complete.json").write_text('{"demo": false}')
    (finished / "model.safetensors").write_bytes(b"precious")
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    before = _digest(tmp_path)
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            code = main(["train", *argv])
        except SystemExit as e:  # argparse's own usage errors (exit 2) and --help (exit 0)
            code = e.code
    assert code in (0, 2), (argv, code, err.getvalue()[-500:])
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert "error:" in err.getvalue(), err.getvalue()[-500:]
    after = _digest(tmp_path)
    for name, digest in before.items():
        assert after.get(name) == digest, name
    if not reached:
        event(f"exit {code}: stopped by the argument checks")
        return
    args = reached[0]
    aimed_at_finished = "\0" not in args.output_dir and Path(args.output_dir).resolve() == finished.resolve()
    if aimed_at_finished and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        assert code == 2 and "already holds a finished run" in err.getvalue(), (argv, err.getvalue())
    event(f"exit {code}: reached the run" + (", aimed at the finished run" if aimed_at_finished else ""))


def test_output_dir_hazards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "notadir"
    a_file.write_text("keep me")
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert main(["train", "--output_dir", str(a_file), "--max_steps", "1"]) == 2
        assert main(["train", "--output_dir", str(a_file / "sub"), "--max_steps", "1"]) == 2
    assert "is a file, not a folder" in err.getvalue() and "cannot write to output_dir" in err.getvalue()
    assert a_file.read_text() == "keep me"
