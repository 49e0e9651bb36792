"""``preftune verify RUN_DIR``: check a run folder and its checkpoints against their manifests
(:mod:`preftune.verify`). Exit code 0: everything intact; 1: something is damaged or incomplete."""

from __future__ import annotations

import time

from .options import Positional, build_parser, parse_options

__all__ = ["build_verify_parser", "cmd_verify"]


def build_verify_parser():
    from ..config import VerifyArguments

    return build_parser(
        "preftune verify",
        "Check a run folder of `preftune train` and its checkpoints against the size and xxh3-128 hash of every file, "
        "recorded when each was completed; prints one row per folder and which checkpoint --resume_from_checkpoint latest would use. "
        "Exit code 0: all intact; 1: something is damaged or incomplete.",
        (VerifyArguments,),
        (Positional("run_dir", "RUN_DIR", "output folder of `preftune train` (or one checkpoint-N folder in it)"),),
    )


def cmd_verify(argv: list[str]) -> int:
    from pathlib import Path

    from ..verify import all_intact, format_report, verify_folder

    verify_args, where = parse_options(build_verify_parser(), argv, "verify")
    folder = Path(where.run_dir).expanduser()
    started = time.perf_counter()
    rows = verify_folder(folder, contents=not verify_args.sizes_only)
    print(format_report(folder, rows, not verify_args.sizes_only, time.perf_counter() - started))
    return 0 if all_intact(rows) else 1
