"""``preftune convert truthfulqa IN OUT``: a TruthfulQA-style table to prompt/chosen/rejected JSON lines.

Like ``merge`` and ``export``, an existing OUT is refused before any work unless ``--overwrite``,
missing parent folders are created, and OUT is written under a temporary name and renamed when
complete: it is whole, or as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError, PreftuneError
from .options import Positional, build_parser, parse_options

__all__ = ["build_convert_parser", "cmd_convert"]


def build_convert_parser():
    from ..config import ConvertArguments
    from ..data.convert import TRUTHFULQA_COLUMNS_TEXT
    from ..data.io import SUPPORTED_FILE_TYPES

    return build_parser(
        "preftune convert",
        f"Convert a TruthfulQA-style table into prompt/chosen/rejected JSON lines for `preftune train`. The table needs "
        f"the columns {TRUTHFULQA_COLUMNS_TEXT}; several incorrect answers are separated by ';' (or given as a list). Each question gives "
        "one pair per incorrect answer: prompt = the question, chosen = the best answer, rejected = the incorrect answer.",
        (ConvertArguments,),
        (Positional("format", "FORMAT", "input table format: truthfulqa"),
         Positional("input", "INPUT", f"the table: {SUPPORTED_FILE_TYPES}"),
         Positional("output", "OUTPUT", "the .jsonl file to write")),
    )


def cmd_convert(argv: list[str]) -> int:
    args, where = parse_options(build_convert_parser(), argv, "convert")
    from ..data.convert import CONVERTERS, check_truthfulqa_columns, truthfulqa_to_pairs
    from ..data.io import BadRecord, read_records

    if where.format not in CONVERTERS:
        raise PreftuneError(f"unknown format {where.format!r}; preftune convert knows {', '.join(CONVERTERS)}")
    if not where.output.strip():
        raise PreftuneError("OUTPUT is empty; give the .jsonl file to write, e.g. pairs.jsonl")
    out = Path(where.output).expanduser()
    _check_output(out, Path(where.input), args.overwrite)
    table = read_records(where.input)
    check_truthfulqa_columns(table, where.input)
    records = truthfulqa_to_pairs(table, args.max_pairs_per_question)
    bad = [r for r in records if isinstance(r, BadRecord)]
    good = [r for r in records if not isinstance(r, BadRecord)]
    # an empty output file would only move the failure to training
    if not good and not bad:
        raise DataError(where.input, "no preference pairs to write: the table has no rows", "check that this is the table you meant")
    if not good:
        raise DataError(where.input, f"no preference pairs to write: {_bad_rows(bad, ' and no good one')}",
                        "fix those rows, or check that this is the table you meant")
    _write_json_lines(out, [r.row for r in good])
    print(f"wrote {_count(len(good), 'pair')} to {out}" + (f"; skipped {_bad_rows(bad)}" if bad else ""))
    return 0


def _check_output(out: Path, source: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise PreftuneError(f"output {str(out)!r} is a folder; give a file name such as {str(out / 'pairs.jsonl')!r}")
    if not out.exists():
        return
    if not out.is_file():  # /dev/null, a pipe: the final rename would replace the device itself
        raise PreftuneError(f"output {str(out)!r} is not a regular file; choose an output file such as 'pairs.jsonl'")
    if out.resolve() == source.expanduser().resolve():
        raise PreftuneError("output would overwrite the input; choose another output file")
    if not overwrite:
        raise PreftuneError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose another output file")


def _write_json_lines(out: Path, rows: list[dict]) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(folder for folder in out.parents if folder.exists())  # the nearest existing one is a file
        raise PreftuneError(f"cannot write {str(out)!r}: {str(blocker)!r} is a file, not a folder; choose another output path") from None
    except OSError as e:
        raise PreftuneError(f"cannot create the folder {str(out.parent)!r}: {e.strerror or e}; choose another output path") from None
    # beside OUT, so that the rename is atomic; mode "x" never replaces a file that is not ours
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    created = False
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            created = True
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise PreftuneError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    finally:
        if created:
            tmp.unlink(missing_ok=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _bad_rows(bad: list, after_count: str = "") -> str:
    return f"{_count(len(bad), 'bad row')}{after_count} (first: {bad[0].where}: {bad[0].detail})"
