"""Writes that cannot half-succeed: checkpoint markers, checkpoint rotation and the final save.

The rule everywhere: a folder counts as written only once its record is in place, and the record
is written last, atomically, after the data is on disk (fsync).

* A checkpoint: transformers writes ``checkpoint-N`` in place; then :func:`mark_checkpoint_complete`
  fsyncs every file and writes ``.complete`` with each file's size and xxh3-128 hash.
* Old checkpoints are deleted (``--save_total_limit``) by :func:`rotate_checkpoints` only *after*
  the new one is marked, and each is renamed away before its files go, so a kill at any moment
  leaves at least one checkpoint that verifies. (transformers deletes them inside
  ``Trainer._save_checkpoint``, before ``on_save``: with ``save_total_limit=1`` a kill between its
  deletion and our marker left nothing to resume from; :class:`preftune.trainer.PreferenceTrainer`
  hands rotation to us.)
* The final model is written into a hidden staging folder and moved into place file by file; then
  :func:`finish_run` writes ``run_complete.json`` with the manifest of everything a reader needs.
  :func:`begin_run` removes an earlier ``run_complete.json`` before a run changes the folder.
* :func:`writes_fail_cleanly`: a failed write (full disk, file-size limit, I/O error) while saving
  a checkpoint or the final model removes what it half wrote, leaves earlier checkpoints alone,
  and ends in one line naming the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Iterator

from transformers import TrainerCallback

from .errors import PreftuneError, describe_exception
from .integrity import build_manifest
from .rundir import (
    CHECKPOINT_COMPLETE_MARKER,
    RUN_COMPLETE_FILE,
    RUN_CONFIG_FILE,
    RUN_RECORD_FILES,
    TRAINER_STATE_FILE,
    UNCHECKED_FILES,
    checkpoint_status,
    find_latest_checkpoint,
    list_checkpoints,
    write_json,
)

logger = logging.getLogger(__name__)

__all__ = ["mark_checkpoint_complete", "rotate_checkpoints", "discard_unusable_checkpoints_after", "begin_run", "staged_final_model", "StagedModel", "finish_run", "writes_fail_cleanly",
           "discard_folder", "FINAL_STAGING_DIR"]

FINAL_STAGING_DIR = ".final-model.partial"  # hidden: never mistaken for a model or a checkpoint
_DISCARD_PREFIX = ".discarding-"


def _files_below(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, ``/``-separated), except the checkpoint marker and its temporary."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(CHECKPOINT_COMPLETE_MARKER))


def _fsync(paths) -> None:
    """Flush ``paths`` to disk so a record written afterwards never reaches the disk before the data."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def mark_checkpoint_complete(checkpoint: Path, step: int, origin: dict | None = None) -> bool:
    """fsync every file of ``checkpoint``, then write its ``.complete`` marker: the step, ``origin``
    (how the run was launched and batched: ``world_size``, ``nodes``, ``launcher``, ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``, ``max_tokens_per_batch``; read back by
    :func:`preftune.rundir.checkpoint_origin`) and the manifest (size and xxh3-128 of every file),
    sealed with its own checksum.

    Returns False (and writes nothing) when the checkpoint lacks the Trainer's state file, i.e. the
    Trainer did not finish writing it.
    """
    if not (checkpoint.is_dir() and (checkpoint / TRAINER_STATE_FILE).exists()):
        return False
    files = _files_below(checkpoint)
    _fsync([checkpoint / f for f in files])
    record = {"step": step, **(origin or {}), "manifest": build_manifest(checkpoint, files)}
    write_json(checkpoint / CHECKPOINT_COMPLETE_MARKER, record, seal=True)
    _fsync([checkpoint])  # the rename of the marker into place
    return True


def discard_folder(path: Path) -> None:
    """Delete ``path`` so that no reader ever sees it half-deleted: first renamed to a hidden name
    (one atomic step: it stops being a checkpoint), then removed."""
    hidden = path.with_name(f"{_DISCARD_PREFIX}{path.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    try:
        os.replace(path, hidden)
    except OSError:
        hidden = path
    shutil.rmtree(hidden, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep_last: int | None, newest_step: int, protect: str | Path | None = None) -> list[Path]:
    """After ``checkpoint-<newest_step>`` was marked complete, keep it and the ``keep_last - 1`` newest
    older checkpoints that are complete (sizes checked); delete the other older ones (also incomplete or
    damaged ones). Checkpoints newer than ``newest_step`` (an earlier run's, before a resume) and
    ``protect`` (the best checkpoint) are kept. Returns the deleted folders."""
    out = Path(output_dir)
    for leftover in out.glob(f"{_DISCARD_PREFIX}*"):  # a kill during an earlier deletion
        shutil.rmtree(leftover, ignore_errors=True)
    if not keep_last or keep_last < 1:
        return []
    protected = Path(protect).resolve() if protect else None
    kept, deleted = 1, []
    for step, path in list_checkpoints(out):
        if step >= newest_step or path.resolve() == protected:
            continue
        if kept < keep_last and checkpoint_status(path, contents=False).usable:
            kept += 1
            continue
        discard_folder(path)
        deleted.append(path)
    if deleted:
        logger.info("deleted %s (--save_total_limit %d)", ", ".join(p.name for p in deleted), keep_last)
    return deleted


def discard_unusable_checkpoints_after(output_dir: str | Path, step: int) -> list[Path]:
    """Delete the checkpoints newer than ``step`` (the one a run resumes from) that are damaged or
    incomplete: this run writes them again, and writers read what they find in place (peft updates
    an existing README.md; a stale marker would describe other files). Intact newer ones (from
    before a resume to an earlier step) stay until the run overwrites them."""
    discarded = []
    for n, path in list_checkpoints(output_dir):
        if n <= step:
            break
        status = checkpoint_status(path)
        if not status.usable:
            logger.warning("removing %s (%s): this run writes it again", path, status.detail)
            discard_folder(path)
            discarded.append(path)
    return discarded


def begin_run(out: Path) -> None:
    """A run is about to change ``out``: an earlier run's ``run_complete.json`` no longer describes it
    (until this run finishes, readers see an unfinished run), and a staging folder left by a killed
    final save is removed."""
    (out / RUN_COMPLETE_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / FINAL_STAGING_DIR, ignore_errors=True)


class BeginRunCallback(TrainerCallback):
    """:func:`begin_run`, then ``run_config.json``, when training begins (main process).

    ``on_train_begin`` comes after the Trainer has built its optimizer and loaded a checkpoint to
    resume from, and after preftune's memory preflight: a run that fails while setting up (an
    option the optimizer refuses, a preflight that finds no memory, a checkpoint that does not
    load) leaves the folder, and a finished run in it, as they were."""

    def __init__(self, out: Path, run_config: dict):
        self.out, self.run_config = out, run_config

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            begin_run(self.out)
            write_json(self.out / RUN_CONFIG_FILE, self.run_config)


@dataclass
class StagedModel:
    """The staging folder a final save writes into, and (after the ``with`` block) the files it holds."""

    folder: Path
    files: list[str] = field(default_factory=list)


@contextlib.contextmanager
def staged_final_model(out: Path) -> Iterator[StagedModel]:
    """Save the model and tokenizer into ``staged.folder`` (a staging folder inside ``out``) inside
    the ``with`` block; when the block ends, each entry moves into ``out`` and ``staged.files`` lists
    the files written (relative paths), for :func:`finish_run`.

    If the block fails, the staging folder is removed: no file of this attempt is left in ``out``.
    """
    staged = StagedModel(out / FINAL_STAGING_DIR)
    shutil.rmtree(staged.folder, ignore_errors=True)
    staged.folder.mkdir(parents=True)
    try:
        yield staged
        staged.files = _files_below(staged.folder)
        for entry in sorted(staged.folder.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staged.folder, ignore_errors=True)


def finish_run(out: Path, record: dict, model_files: list[str]) -> Path:
    """Write ``run_complete.json`` last: ``record`` plus the manifest of ``model_files`` and the run's
    records (:data:`preftune.rundir.RUN_RECORD_FILES`), sealed. Until it exists the run is unfinished.
    The model card and the curves (:data:`preftune.rundir.UNCHECKED_FILES`) are left out: nothing
    reads them back, and people edit model cards."""
    files = sorted((set(model_files) | {name for name in RUN_RECORD_FILES if (out / name).is_file()}) - set(UNCHECKED_FILES))
    _fsync([out / f for f in files])
    path = write_json(out / RUN_COMPLETE_FILE, {**record, "manifest": build_manifest(out, files)}, seal=True)
    _fsync([out])
    return path


def _failure_reason(err: BaseException, out: Path) -> str:
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror + (f": {Path(err.filename).name}" if err.filename else "")
    else:
        reason = describe_exception(err)
    with contextlib.suppress(OSError):
        reason += f"; {shutil.disk_usage(out).free / 1e9:.1f} GB free on that disk"
    try:  # some writers (torch.save) hide the OS error: name the other usual cause
        import resource
    except ImportError:  # not a POSIX system
        return reason
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        reason += f"; a file-size limit (ulimit -f) of {limit:,} bytes is set"
    return reason


@contextlib.contextmanager
def writes_fail_cleanly(out: Path, what: str, partial_checkpoint: Callable[[], Path] | None = None):
    """Turn a failed write inside the block into one :class:`PreftuneError` line, after cleaning up.

    Without ``partial_checkpoint`` (the final save) every error counts as a failed write of ``what``.
    With it (training), an error counts only when ``partial_checkpoint()`` names an existing checkpoint
    folder that does not verify (no marker yet, or an older marker that no longer matches the files
    being rewritten), i.e. the error struck while that checkpoint was being written; that folder is
    removed. Other errors pass through unchanged. Earlier checkpoints are never touched.
    """
    try:
        yield
    except PreftuneError:
        raise
    except Exception as err:
        removed = ""
        if partial_checkpoint is not None:
            partial = partial_checkpoint()
            if not partial.is_dir() or checkpoint_status(partial).usable:
                raise
            what = partial.name
            discard_folder(partial)
            removed = f"removed the partial {partial.name}; "
        latest = find_latest_checkpoint(out)
        where = (f"free space, then resume from {latest.name} with --resume_from_checkpoint latest" if latest
                 else "free space, then start the run again")
        raise PreftuneError(f"could not write {what} in {str(out)!r} ({_failure_reason(err, out)}); {removed}"
                            f"earlier checkpoints are untouched; {where}") from err
