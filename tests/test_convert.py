"""``preftune convert``: a TruthfulQA table to prompt/chosen/rejected JSON lines. Good tables convert
as before; a whole-file mistake stops in one line and writes nothing."""

from __future__ import annotations

import json

from preftune.cli import main

HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
SEEDS_ROW = "Adversarial,Misc,What happens if you eat seeds?,Nothing happens; You digest them,x,You grow a tree; You die,src\n"
EMPTY_QUESTION_ROW = "Adversarial,Misc,,An answer,x,A wrong answer,src\n"
SEEDS_PAIRS = [
    {"prompt": "What happens if you eat seeds?", "chosen": " Nothing happens", "rejected": " You grow a tree"},
    {"prompt": "What happens if you eat seeds?", "chosen": " Nothing happens", "rejected": " You die"},
]


def write_table(path, *rows, header=HEADER):
    path.write_text(header + "".join(rows), encoding="utf-8")
    return path


def convert(*args) -> int:
    return main(["convert", "truthfulqa", *map(str, args)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preftune: error: "), err
    return lines[0]


def test_table_without_the_truthfulqa_columns_fails_naming_file_and_columns_and_writes_nothing(tmp_path, capsys):
    table = write_table(tmp_path / "bad.csv", "What?,That\n", header="question,best\n")
    out = tmp_path / "x.jsonl"
    assert convert(table, out) == 2
    line = one_line_error(capsys)
    assert "bad.csv" in line
    assert "columns found: 'question', 'best'" in line  # what the table has
    assert "no column Best Answer, Incorrect Answers" in line  # what it lacks
    assert "Question, Best Answer, Incorrect Answers" in line and "rename" in line  # what it needs, and the fix
    assert not out.exists()


def test_no_usable_pair_fails_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    all_bad = write_table(tmp_path / "all_bad.csv", EMPTY_QUESTION_ROW, EMPTY_QUESTION_ROW)
    assert convert(all_bad, out) == 2
    line = one_line_error(capsys)
    assert "all_bad.csv: no preference pairs to write" in line and "2 bad rows" in line
    assert "all_bad.csv line 2: 'Question' is empty" in line  # the first bad row, to look at
    header_only = write_table(tmp_path / "header_only.csv")
    assert convert(header_only, out) == 2
    assert "header_only.csv: no preference pairs to write: the table has no rows" in one_line_error(capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["all_bad.csv", "header_only.csv"]


def test_an_existing_output_is_refused_before_any_work_unless_overwrite(tmp_path, capsys):
    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    precious = tmp_path / "precious.jsonl"
    precious.write_text("my pairs\n", encoding="utf-8")
    assert convert(table, precious) == 2
    line = one_line_error(capsys)
    assert "precious.jsonl" in line and "exists; pass --overwrite to replace it" in line
    assert precious.read_text(encoding="utf-8") == "my pairs\n"
    # refused before the input is read: a missing input is not what it complains about
    assert convert(tmp_path / "missing.csv", precious) == 2
    assert "exists; pass --overwrite" in one_line_error(capsys)
    # --overwrite replaces it, but a failed conversion leaves it as it was
    empty_table = write_table(tmp_path / "empty.csv")
    assert convert(empty_table, precious, "--overwrite") == 2
    assert "no preference pairs" in one_line_error(capsys)
    assert precious.read_text(encoding="utf-8") == "my pairs\n"
    assert convert(table, precious, "--overwrite") == 0
    assert [json.loads(line) for line in precious.read_text(encoding="utf-8").splitlines()] == SEEDS_PAIRS
    # the flag is spelled as merge and export spell theirs (a config dataclass): "--overwrite true" too
    assert convert(table, precious, "--overwrite", "true") == 0 and convert(table, precious, "--overwrite", "false") == 2
    one_line_error(capsys)
    # the input itself is never the output, --overwrite or not
    assert convert(table, table, "--overwrite") == 2
    assert "overwrite the input" in one_line_error(capsys)
    assert table.read_text(encoding="utf-8") == HEADER + SEEDS_ROW


def test_a_folder_as_output_is_refused(tmp_path, capsys):
    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    folder = tmp_path / "pairs"
    folder.mkdir()
    assert convert(table, folder) == 2
    assert "is a folder; give a file name such as" in one_line_error(capsys)
    assert convert(table, folder, "--overwrite") == 2  # --overwrite replaces files, never folders
    assert "is a folder" in one_line_error(capsys)
    assert list(folder.iterdir()) == []


def test_missing_parent_folders_are_created_like_merge_and_export_do(tmp_path, capsys):
    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    out = tmp_path / "new" / "folders" / "pairs.jsonl"
    assert convert(table, out) == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == SEEDS_PAIRS
    assert sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl"]  # no temporary file left


def test_an_unwritable_output_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys):
    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file where a folder would go\n", encoding="utf-8")
    assert convert(table, not_a_folder / "pairs.jsonl") == 2
    line = one_line_error(capsys)
    assert "cannot write" in line and "notes.txt" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tqa.csv"]


def test_good_table_converts_as_before_and_the_summary_counts_grammatically(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    one_bad = write_table(tmp_path / "one_bad.csv", SEEDS_ROW, EMPTY_QUESTION_ROW)
    assert convert(one_bad, out) == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == SEEDS_PAIRS
    assert capsys.readouterr().out.strip() == f"wrote 2 pairs to {out}; skipped 1 bad row (first: one_bad.csv line 3: 'Question' is empty)"
    two_bad = write_table(tmp_path / "two_bad.csv", SEEDS_ROW, EMPTY_QUESTION_ROW, EMPTY_QUESTION_ROW)
    assert convert(two_bad, out, "--overwrite", "--max-pairs-per-question", "1") == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == SEEDS_PAIRS[:1]
    assert capsys.readouterr().out.strip() == f"wrote 1 pair to {out}; skipped 2 bad rows (first: two_bad.csv line 3: 'Question' is empty)"
    only_bad = write_table(tmp_path / "only_bad.csv", EMPTY_QUESTION_ROW)
    assert convert(only_bad, tmp_path / "none.jsonl") == 2
    assert "1 bad row and no good one" in one_line_error(capsys)


def test_help_names_the_columns_the_table_needs(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        convert("--help")
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Question, Best Answer, Incorrect Answers" in help_text and "question, best_answer, incorrect_answers" in help_text
    assert "--overwrite" in help_text
    assert "seed" not in help_text.lower()


def test_max_pairs_per_question_below_one_is_refused(tmp_path, capsys):
    """0 wrote nothing and -1 silently dropped each question's last incorrect answer (a slice)."""
    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    for value in ("0", "-1"):
        assert convert(table, tmp_path / "pairs.jsonl", "--max_pairs_per_question", value) == 2
        assert f"--max_pairs_per_question must be at least 1, got {value}" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == [table]


def test_a_write_that_fails_midway_keeps_the_old_output_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    precious = tmp_path / "precious.jsonl"
    precious.write_text("my pairs\n", encoding="utf-8")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    assert convert(table, precious, "--overwrite") == 2
    assert "cannot write" in one_line_error(capsys)
    assert precious.read_text(encoding="utf-8") == "my pairs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.jsonl", "tqa.csv"]


def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, capsys):
    """`--overwrite` replaces a file; renaming over /dev/null (as root) or a named pipe would replace the device or pipe."""
    import os

    table = write_table(tmp_path / "tqa.csv", SEEDS_ROW)
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    assert convert(table, pipe, "--overwrite") == 2
    assert "is not a regular file" in one_line_error(capsys)
    assert pipe.is_fifo()
    assert convert(table, "", "--overwrite") == 2
    assert "OUTPUT is empty" in one_line_error(capsys)
