"""What ``preftune verify RUN_DIR`` checks and prints (the command: :mod:`preftune.commands.verify`).

One row per folder: the run itself (its ``run_complete.json`` manifest), every ``checkpoint-N``
(its ``.complete`` manifest), newest first, and every cached reference table in ``ref_logps/``.
Each is ``ok``, ``unverified`` (complete, but written before manifests existed), ``damaged`` (the
first file that differs, expected vs found) or ``incomplete`` (never finished). The last line says
which checkpoint ``--resume_from_checkpoint latest`` would use. Exit code 0 when nothing is
damaged or incomplete, 1 otherwise; a folder that is not a run ends in one error line (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from .errors import PreftuneError
from .rundir import (
    CHECKPOINT_COMPLETE_MARKER,
    REF_CACHE_DIR,
    RUN_COMPLETE_FILE,
    RUN_CONFIG_FILE,
    FolderStatus,
    checkpoint_status,
    is_checkpoint_folder,
    is_run_folder,
    list_checkpoints,
    run_status,
)

__all__ = ["verify_folder", "format_rows", "format_report", "all_intact"]


def _cache_rows(folder: Path) -> list[FolderStatus]:
    cache_dir = folder / REF_CACHE_DIR
    if not cache_dir.is_dir():
        return []
    from .reference import check_cache_file

    rows = []
    for path in sorted(cache_dir.glob("*.safetensors")):
        problem = check_cache_file(path)
        rows.append(FolderStatus(path, "ok", "reference log-probs intact") if problem is None
                    else FolderStatus(path, "damaged", f"{problem}; the next run that needs it recomputes it"))
    return rows


def verify_folder(folder: str | Path, contents: bool = True) -> list[FolderStatus]:
    """The status of the run in ``folder``, of each checkpoint (newest first) and each cached reference table."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PreftuneError(f"run folder {str(folder)!r} not found" if not folder.exists() else f"{str(folder)!r} is a file; pass the run folder")
    if is_checkpoint_folder(folder):
        return [checkpoint_status(folder, contents)]
    if not is_run_folder(folder):
        raise PreftuneError(f"{str(folder)!r} is not a run folder of `preftune train` (it has none of {RUN_CONFIG_FILE}, {RUN_COMPLETE_FILE}) "
                            f"nor a checkpoint (no {CHECKPOINT_COMPLETE_MARKER})")
    rows = [run_status(folder, contents)]
    rows += [checkpoint_status(path, contents) for _, path in list_checkpoints(folder)]
    return rows + (_cache_rows(folder) if contents else [])


def format_rows(folder: Path, rows: list[FolderStatus]) -> str:
    def name(path: Path) -> str:
        if path == folder:
            return path.name if is_checkpoint_folder(folder) else ". (the run)"
        return str(path.relative_to(folder)) if folder in path.parents else path.name

    names = [name(row.path) for row in rows]
    width = max(len("folder"), *(len(n) for n in names))
    lines = [f"{'folder':<{width}}  {'status':<10}  detail"]
    lines += [f"{name:<{width}}  {row.state:<10}  {row.detail}" for name, row in zip(names, rows)]
    return "\n".join(lines)


def all_intact(rows: list[FolderStatus]) -> bool:
    return all(row.usable for row in rows)


def format_report(folder: Path, rows: list[FolderStatus], contents: bool, seconds: float) -> str:
    """The table, which checkpoint ``latest`` would use, and how much was read."""
    lines = [f"preftune verify: {folder} ({'size and xxh3-128 of every file' if contents else 'sizes only'})", "", format_rows(folder, rows)]
    if not is_checkpoint_folder(folder):
        latest = next((row.path.name for row in rows if is_checkpoint_folder(row.path) and row.usable), None)
        lines += ["", f"--resume_from_checkpoint latest would use: {latest or 'none (no checkpoint verifies)'}"]
    intact = sum(row.usable for row in rows)
    hashed = sum(row.check.bytes for row in rows if row.check is not None)
    lines.append(f"{intact} of {len(rows)} intact; {hashed / 1e6:.1f} MB hashed in {seconds:.2f} s")
    return "\n".join(lines)
