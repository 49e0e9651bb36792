"""Hostile input: property-based tests over the data pipeline and the CLI.

Every case must end in a usable result, a counted skip, or a clear one-line error (DataError /
PreftuneError, exit code 2 from the CLI) — never another exception or a traceback — and must
not damage anything already on disk. docs/reliability.md records how many inputs these try.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
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
rows = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "system", "extra", ""]), values, max_size=5)


@SETTINGS
@given(rows)
def test_normalize_never_crashes(row):
    result = normalize_record(Record(row, "f.jsonl line 1"), ColumnMap(), 0)
    if isinstance(result, BadRow):
        assert result.reason in KNOWN_REASONS, result
        assert result.where == "f.jsonl line 1" and result.detail
    else:
        assert isinstance(result, PreferenceExample)
        for part in (result.prompt, result.chosen, result.rejected):
            assert part  # never an empty prompt or completion
        assert result.chosen != result.rejected


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_jsonl_csv_json(tmp_path, blob):
    for name in ("d.jsonl", "d.csv", "d.json", "d.jsonl.gz", "d.parquet"):
        path = tmp_path / name
        path.write_bytes(blob)
        try:
            data = load_examples(str(path), on_bad_row="skip")
        except PreftuneError as e:  # DataError included
            assert "\n" not in str(e).strip() and str(e)
        else:
            assert data.examples


@SETTINGS
@given(st.lists(st.one_of(rows.map(json.dumps), texts), min_size=1, max_size=8))
def test_jsonl_lines_error_names_line(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        data = load_examples(str(path))
    except PreftuneError as e:
        msg = str(e)
        assert "prefs.jsonl" in msg
        assert " line " in msg or "no usable" in msg
    else:
        assert all(isinstance(ex, PreferenceExample) for ex in data.examples)


@pytest.fixture(scope="module")
def llama_or_demo_tokenizer():
    from conftest import LLAMA2_TOKENIZER

    if LLAMA2_TOKENIZER.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(LLAMA2_TOKENIZER))
    from preftune.demo import build_demo_tokenizer

    return build_demo_tokenizer()


@SETTINGS
@given(texts, texts, texts, st.integers(2, 40), st.integers(1, 30), st.sampled_from(["keep_end", "keep_start"]))
def test_tokenize_arbitrary_unicode_respects_limits(llama_or_demo_tokenizer, prompt, chosen, rejected, max_length, max_prompt, mode):
    row = normalize_record(Record({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "r"), ColumnMap(), 0)
    if isinstance(row, BadRow):
        return
    pairs, report = tokenize_examples(llama_or_demo_tokenizer, [row], TokenizeSettings(max_length=max_length, max_prompt_length=max_prompt, truncation_mode=mode))
    assert len(pairs) + sum(report.dropped.values()) == 1
    for p in pairs:
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


FLAG_TOKENS = ["--model_name_or_path", "--dataset_name", "--output_dir", "--max_steps", "--beta", "--method", "--on_bad_row",
               "--max_length", "--config", "--eval_fraction", "--batch_layout", "--truncation_mode", "--learning_rate", "--nll_on_prompt",
               "--resume_from_checkpoint", "--overwrite_output_dir", "-1", "0", "abc", "1e309", "nan", "orpo", "dpo", "skip", "", "🤖",
               "\x00", "../..", "/dev/null", "latest", "true", "yes", "--", "-", "--help-me", "train.jsonl"]


@settings(max_examples=max(EXAMPLES // 2, 20), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(FLAG_TOKENS), max_size=6))
def test_cli_argv_fuzz_never_tracebacks(tmp_path, monkeypatch, argv):
    """Random flags: exit 0 or 2 with a one-line message, never an uncaught exception; the
    finished run already in the working folder is untouched (unless --overwrite_output_dir).

    Parsing, validation and the output-folder checks are real; the training itself is replaced
    by a stub (real runs are covered in test_cli.py and test_reliability.py).
    """
    import preftune.run as run
    from preftune.rundir import check_output_dir

    def validate_only(model_args, data_args, args):
        out = check_output_dir(args.output_dir, args.overwrite_output_dir, bool(args.resume_from_checkpoint), model_args.is_demo)
        if data_args.dataset_name:
            load_examples(data_args.dataset_name, data_args.dataset_split, on_bad_row=data_args.on_bad_row)
        return run.RunResult(out, {}, 0, 0, 0.0)

    monkeypatch.setattr(run, "run_training", validate_only)
    monkeypatch.chdir(tmp_path)
    finished = tmp_path / "preftune-demo"
    finished.mkdir(exist_ok=True)
    (finished / "run_complete.json").write_text('{"demo": false}')
    (finished / "model.safetensors").write_bytes(b"precious")
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
    if "--overwrite_output_dir" not in argv:
        after = _digest(tmp_path)
        for name, digest in before.items():
            assert after.get(name) == digest, name


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
