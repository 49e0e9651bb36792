"""The run folder: the name of every file a run writes, and the rules for reading and writing them.

This module is the one place that knows the layout of a ``preftune train`` output folder::

    OUT/
      run_config.json            model, data and training settings (written before training)
      metrics.jsonl              one JSON object per log event (appended during training)
      samples.jsonl              greedy answers to fixed held-out prompts per evaluation (--eval_generate)
      checkpoint-N/              Trainer checkpoints; ``.complete`` written last, once all is on disk,
                                 holding the size and xxh3-128 hash of every file in the checkpoint
      ref_logps/<fp>.safetensors precomputed DPO reference log-probs (``--precompute_ref_log_probs``)
      model.safetensors ...      the trained model (full model), or adapter_*.json/.safetensors (LoRA),
                                 or reft_config.json + reft_interventions.safetensors (ReFT)
      tokenizer files
      training_curves.png        curves drawn from metrics.jsonl
      README.md                  model card
      run_complete.json          written last: the run finished (final metrics, seconds) and the size
                                 and hash of every model, tokenizer and record file it wrote
      eval.json, generations.*   written by ``preftune eval``
      report.html                written by ``preftune report``

Other modules import the names below instead of spelling file names themselves. Every command that
reads a run goes through :func:`open_run`, which checks the folder against its manifest first and
fails in one line naming the damaged file; ``--resume_from_checkpoint`` goes through
:func:`resolve_resume`, which uses only checkpoints that verify. The writing side (markers,
rotation, the final save) is :mod:`preftune.saving`; the hashing is :mod:`preftune.integrity`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import PreftuneError
from .integrity import ManifestCheck, bytes_digest, check_manifest, is_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_CONFIG_FILE", "RUN_COMPLETE_FILE", "METRICS_FILE", "CURVES_FILE", "MODEL_CARD_FILE", "EVAL_FILE",
    "GENERATIONS_JSONL", "GENERATIONS_MD", "REPORT_FILE", "MERGE_RECORD_FILE", "SAMPLES_FILE", "REF_CACHE_DIR", "CHECKPOINT_COMPLETE_MARKER",
    "TRAINER_STATE_FILE", "SYNCED_REF_MODEL_FILE", "CHECKPOINT_PREFIX", "MODEL_CONFIG_FILE", "ADAPTER_CONFIG_FILE", "REFT_CONFIG_FILE", "REFT_WEIGHTS_FILE",
    "TOKENIZER_FILES", "RUN_RECORD_FILES", "UNCHECKED_FILES", "check_output_dir", "checkpoint_path", "list_checkpoints", "checkpoint_status",
    "latest_checkpoint", "find_latest_checkpoint", "resolve_resume", "CheckpointOrigin", "checkpoint_origin", "run_status", "folder_status", "FolderStatus", "RunFolder",
    "open_run", "read_json", "write_json", "write_text_atomic", "is_run_folder", "is_checkpoint_folder", "read_sealed_json", "read_run_config", "model_kind",
]

# --- what a training run writes ------------------------------------------------------------------
RUN_CONFIG_FILE = "run_config.json"
RUN_COMPLETE_FILE = "run_complete.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CURVES_FILE = "training_curves.png"
MODEL_CARD_FILE = "README.md"
REF_CACHE_DIR = "ref_logps"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE_MARKER = ".complete"
TRAINER_STATE_FILE = "trainer_state.json"  # written by transformers.Trainer into every checkpoint
SYNCED_REF_MODEL_FILE = "ref_model.safetensors"  # TR-DPO's synced reference, in every checkpoint (preftune.ref_sync)
# --- what the saved model consists of (one of three kinds) -----------------------------------------
MODEL_CONFIG_FILE = "config.json"  # a full model (save_pretrained)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a LoRA/DoRA adapter (peft)
REFT_CONFIG_FILE = "reft_config.json"  # ReFT interventions
REFT_WEIGHTS_FILE = "reft_interventions.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# what `preftune report` reads: checked even when the model files are not needed
RUN_RECORD_FILES = (RUN_CONFIG_FILE, METRICS_FILE, SAMPLES_FILE)
# written for people and never read back (users edit model cards): left out of the manifest
UNCHECKED_FILES = (MODEL_CARD_FILE, CURVES_FILE)
# --- what the after-training commands write ---------------------------------------------------------
EVAL_FILE = "eval.json"
GENERATIONS_JSONL = "generations.jsonl"
GENERATIONS_MD = "generations.md"
REPORT_FILE = "report.html"
MERGE_RECORD_FILE = "preftune_merge.json"  # written by ``preftune merge`` beside the merged model

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


_SEAL_KEY = "checksum"


def _seal_of(data: dict) -> str:
    return bytes_digest(json.dumps({k: v for k, v in data.items() if k != _SEAL_KEY}, sort_keys=True, ensure_ascii=False).encode())


def _replace_through(tmp: Path, path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``tmp``, fsync, then rename it over ``path``; ``tmp`` is removed on any failure."""
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict, seal: bool = False) -> Path:
    """Write ``data`` as indented JSON through a temporary file, fsync and ``os.replace``: a reader
    (or a crash, or a full disk) never sees half a file. ``seal`` adds a ``checksum`` of the content
    so that :func:`read_sealed_json` notices a flipped byte in the file itself."""
    path = Path(path)
    if seal:
        data = {**data, _SEAL_KEY: _seal_of(data)}
    _replace_through(path.with_name(path.name + ".tmp"), path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a user's file (``preftune chat``'s ``/save``) as :func:`write_json` writes a run's: a
    temporary file beside it (a fresh hidden name, so no other file is touched), fsync, ``os.replace``.
    A failed write leaves ``path`` as it was, and no temporary file. The file gets the permissions
    a new file would get (or the ones of the file it replaces)."""
    import tempfile

    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _replace_through(Path(tmp), path, text, mode)
    return path


def read_sealed_json(path: str | Path) -> tuple[dict | None, str | None]:
    """``(data, None)`` for a file written by ``write_json(..., seal=True)`` and unchanged since;
    ``(None, problem)`` when it is missing, unreadable, not JSON or its checksum does not match.
    A record from before sealing (neither ``checksum`` nor ``manifest``) is returned as it is."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None, "not valid JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    if _SEAL_KEY not in data and "manifest" not in data:
        return data, None  # written before records were sealed (no manifest either): nothing to check
    if data.get(_SEAL_KEY) != _seal_of(data):
        return None, "its checksum does not match its content"
    return {k: v for k, v in data.items() if k != _SEAL_KEY}, None


def read_run_config(folder: str | Path | None) -> dict | None:
    """``run_config.json`` of a ``preftune train`` output folder, or None."""
    return None if folder is None else read_json(Path(folder) / RUN_CONFIG_FILE)


def model_kind(folder: Path) -> str | None:
    """"ReFT", "LoRA adapter" or "full model" from the files in ``folder``; None if no model."""
    if (folder / REFT_CONFIG_FILE).is_file():
        return "ReFT"
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        return "LoRA adapter"
    if (folder / MODEL_CONFIG_FILE).is_file():
        return "full model"
    return None


def check_output_dir(path: str, overwrite: bool, resuming: bool, is_demo: bool = False) -> Path:
    """Refuse unusable or finished output folders before any work is done; returns the folder.

    A folder holding a finished run (``run_complete.json``) is refused unless ``overwrite`` or
    ``resuming``; a finished *demo* run may be re-run over by the demo.
    """
    if "\0" in str(path):  # the OS refuses such names with a ValueError, not an OSError
        raise PreftuneError(f"output_dir {str(path)!r} contains a NUL character; choose another --output_dir")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"output_dir {str(out)!r} is a file, not a folder; choose another --output_dir")
    if (out / RUN_COMPLETE_FILE).exists() and not (overwrite or resuming):
        info = read_json(out / RUN_COMPLETE_FILE) or {}
        if not (is_demo and info.get("demo")):
            raise PreftuneError(
                f"output_dir {str(out)!r} already holds a finished run; pass --overwrite_output_dir to replace it, or choose another --output_dir"
            )
    elif not (overwrite or resuming) and (checkpoints := list_checkpoints(out)):
        # a new run would write its checkpoints over the interrupted run's
        raise PreftuneError(
            f"output_dir {str(out)!r} holds an unfinished run (newest checkpoint: {checkpoints[0][1].name}); pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start again in it, or choose another --output_dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".preftune_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PreftuneError(f"cannot write to output_dir {str(out)!r}: {e.strerror or e}") from None
    return out




# --- checkpoints ------------------------------------------------------------------------------------
def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder in ``output_dir`` as ``(N, path)``, newest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


@dataclass
class FolderStatus:
    """What checking a checkpoint or run folder against its manifest found.

    ``state``: ``ok`` (every file verified), ``unverified`` (complete, but written before manifests
    existed, or not written by ``preftune train``), ``damaged`` (a file is missing or differs; or the
    marker itself is damaged) or ``incomplete`` (never finished: no marker).
    """

    path: Path
    state: str
    detail: str
    check: ManifestCheck | None = None

    @property
    def usable(self) -> bool:
        return self.state in ("ok", "unverified")


def _status_from_check(path: Path, check: ManifestCheck) -> FolderStatus:
    if check.ok:
        if not check.contents:
            return FolderStatus(path, "ok", f"{check.files} files, sizes as recorded (contents not read)", check)
        return FolderStatus(path, "ok", f"{check.files} files verified ({check.bytes / 1e6:.1f} MB hashed in {check.seconds:.2f} s)", check)
    first, more = check.problems[0].describe(), len(check.problems) - 1
    return FolderStatus(path, "damaged", first + (f" (and {more} more file{'s' if more > 1 else ''})" if more else ""), check)


def checkpoint_status(path: Path, contents: bool = True) -> FolderStatus:
    """Check ``checkpoint-N`` against the manifest in its ``.complete`` marker (``contents``: hash
    every file; else sizes only)."""
    marker = path / CHECKPOINT_COMPLETE_MARKER
    if not marker.exists():
        return FolderStatus(path, "incomplete", f"no {CHECKPOINT_COMPLETE_MARKER} marker (interrupted while saving)")
    try:
        legacy = int(marker.read_text(encoding="utf-8").strip())  # marker of a preftune before manifests: the step
    except (OSError, UnicodeDecodeError, ValueError):
        legacy = None
    if legacy is not None:
        if (path / TRAINER_STATE_FILE).is_file():
            return FolderStatus(path, "unverified", f"complete; its {CHECKPOINT_COMPLETE_MARKER} marker predates manifests")
        return FolderStatus(path, "incomplete", f"no {TRAINER_STATE_FILE}")
    data, problem = read_sealed_json(marker)
    if data is None or not is_manifest(data.get("manifest")):
        return FolderStatus(path, "damaged", f"its {CHECKPOINT_COMPLETE_MARKER} marker is damaged ({problem or 'no manifest'})")
    return _status_from_check(path, check_manifest(path, data["manifest"], contents))


@dataclass(frozen=True)
class CheckpointOrigin:
    """How the run that wrote a checkpoint was launched and batched (see :func:`checkpoint_origin`)."""

    world_size: int
    nodes: int = 1
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_tokens_per_batch: int | None = None
    launcher: str = "torchrun"  # preftune.launch.Launch.launcher


_RNG_STATE_RE = re.compile(r"^rng_state_(\d+)\.pth$")


def checkpoint_origin(path: Path) -> CheckpointOrigin | None:
    """The world size (and nodes, batch settings) ``checkpoint-N`` was written with: its ``.complete``
    marker records them (:func:`preftune.saving.mark_checkpoint_complete`). A marker from before
    they were recorded: the world size the Trainer's RNG files show (one ``rng_state_<rank>.pth``
    per process when there were several, else ``rng_state.pth``) and the per-device batch of its
    ``trainer_state.json``. None when neither tells."""
    data, _ = read_sealed_json(path / CHECKPOINT_COMPLETE_MARKER)
    if data is not None and isinstance(data.get("world_size"), int):
        kinds = {"launcher": str}  # every other field is an int (or absent / None: its default)
        recorded = {f.name: data[f.name] for f in fields(CheckpointOrigin) if isinstance(data.get(f.name), kinds.get(f.name, int))}
        return CheckpointOrigin(**recorded)
    try:
        ranks = [int(m.group(1)) for p in path.iterdir() if (m := _RNG_STATE_RE.match(p.name))]
    except OSError:
        return None
    world_size = max(ranks) + 1 if ranks else 1 if (path / "rng_state.pth").is_file() else None
    if world_size is None:
        return None
    per_device = (read_json(path / TRAINER_STATE_FILE) or {}).get("train_batch_size")
    return CheckpointOrigin(world_size, per_device_train_batch_size=per_device if isinstance(per_device, int) else None)


def latest_checkpoint(output_dir: str | Path, contents: bool = True) -> tuple[Path | None, list[FolderStatus]]:
    """The newest checkpoint that verifies, and the statuses of the newer ones that did not."""
    skipped = []
    for _, path in list_checkpoints(output_dir):
        status = checkpoint_status(path, contents)
        if status.usable:
            return path, skipped
        skipped.append(status)
    return None, skipped


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that verifies, or None; logs each one skipped and why."""
    path, skipped = latest_checkpoint(output_dir)
    for status in skipped:
        logger.warning("skipping %s: %s", status.path, status.detail)
    return path


def _newest_good_clause(output_dir: Path, exclude: Path | None = None) -> str:
    for _, path in list_checkpoints(output_dir):
        if path != exclude and checkpoint_status(path).usable:
            return f"the newest good checkpoint is {str(path)!r}"
    return f"no checkpoint in {str(output_dir)!r} verifies"


def resolve_resume(value: str | None, output_dir: Path) -> str | None:
    """``--resume_from_checkpoint``: None, ``latest`` (the newest checkpoint that verifies) or a folder
    (which must verify). Fails in one line naming the damaged file and the checkpoint to use instead."""
    if not value:
        return None
    if str(value) == "latest":
        last, skipped = latest_checkpoint(output_dir)
        for status in skipped:
            logger.warning("skipping %s: %s", status.path, status.detail)
        if last is None:
            why = f" ({skipped[0].path.name}: {skipped[0].detail})" if skipped else ""
            raise PreftuneError(f"--resume_from_checkpoint latest: no complete {CHECKPOINT_PREFIX}* folder in {str(output_dir)!r} verifies{why}; "
                                "start again without --resume_from_checkpoint")
        logger.warning("resuming from %s", last)
        return str(last)
    path = Path(value).expanduser()
    if not (path.is_dir() and ((path / TRAINER_STATE_FILE).exists() or (path / CHECKPOINT_COMPLETE_MARKER).exists())):
        raise PreftuneError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no {TRAINER_STATE_FILE})")
    status = checkpoint_status(path)
    if not status.usable:
        raise PreftuneError(f"--resume_from_checkpoint {value!r}: {status.detail}; {_newest_good_clause(path.parent, exclude=path)} "
                            "(pass it, or --resume_from_checkpoint latest)")
    return str(path)


# --- a finished run ---------------------------------------------------------------------------------
def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is (or was becoming) the output of ``preftune train``."""
    return any((folder / name).is_file() for name in (RUN_CONFIG_FILE, RUN_COMPLETE_FILE))


def is_checkpoint_folder(folder: Path) -> bool:
    return bool(_CHECKPOINT_RE.match(folder.name)) or (folder / CHECKPOINT_COMPLETE_MARKER).exists()


def run_status(folder: Path, contents: bool = True, only: tuple[str, ...] | None = None) -> FolderStatus:
    """Check a run folder against the manifest in ``run_complete.json`` (``only``: just these files)."""
    path = folder / RUN_COMPLETE_FILE
    if not path.exists():
        return FolderStatus(folder, "incomplete", f"the run did not finish (no {RUN_COMPLETE_FILE})")
    record, problem = read_sealed_json(path)
    if record is None:
        return FolderStatus(folder, "damaged", f"{RUN_COMPLETE_FILE} is damaged ({problem})")
    if "manifest" not in record:
        return FolderStatus(folder, "unverified", f"finished; its {RUN_COMPLETE_FILE} predates manifests")
    if not is_manifest(record["manifest"]):
        return FolderStatus(folder, "damaged", f"{RUN_COMPLETE_FILE} is damaged (its manifest is malformed)")
    return _status_from_check(folder, check_manifest(folder, record["manifest"], contents, set(only) if only else None))


def folder_status(folder: Path, contents: bool = True, only: tuple[str, ...] | None = None) -> FolderStatus:
    """The status of a checkpoint, a run folder or (``unverified``) any other folder."""
    if is_checkpoint_folder(folder):
        return checkpoint_status(folder, contents)
    if is_run_folder(folder):
        return run_status(folder, contents, only)
    return FolderStatus(folder, "unverified", "no manifest (not written by preftune train)")


@dataclass
class RunFolder:
    """A run folder, checkpoint or model folder checked by :func:`open_run`, ready to be read."""

    path: Path
    status: FolderStatus
    kind: str | None  # model_kind(path)
    run_config: dict | None  # run_config.json (None: none, or not a run)
    complete: dict | None  # run_complete.json without its manifest (None: unfinished, or not a run)


def _no_model_message(folder: Path) -> str:
    msg = f"{str(folder)!r} holds no saved model (no {MODEL_CONFIG_FILE}, {ADAPTER_CONFIG_FILE} or {REFT_CONFIG_FILE})"
    checkpoints = list_checkpoints(folder)
    if checkpoints:
        return f"{msg}; the run saved checkpoints, e.g. pass {str(checkpoints[0][1])!r}"
    if is_run_folder(folder):
        return f"{msg}; the run in it did not finish (no model was saved)"
    return f"{msg}; pass the output folder of `preftune train` or a save_pretrained folder"


def _where_to_go(status: FolderStatus) -> str:
    """The fix for a damaged or incomplete folder: the checkpoint to use or resume from."""
    folder = status.path
    run = folder.parent if is_checkpoint_folder(folder) else folder
    good = _newest_good_clause(run, exclude=folder)
    if is_checkpoint_folder(folder):
        return f"{good} (pass it instead)" if good.startswith("the newest") else good
    if good.startswith("the newest"):
        return f"{good}: finish the run with `preftune train ... --output_dir {str(run)!r} --resume_from_checkpoint latest`"
    return f"{good}; restore the folder from a copy or train again"


def open_run(path: str | Path, need_model: bool = True) -> RunFolder:
    """Open a run folder (or a checkpoint, or any save_pretrained folder) for reading, verified.

    Every command that reads a run calls this first (chat, eval, merge, report, export). Raises a
    one-line :class:`PreftuneError` when the folder is missing, damaged (a file missing or differing
    from the manifest written when the run finished), incomplete (the run or checkpoint never
    finished; only when ``need_model``) or foreign (no model in it; only when ``need_model``). The
    message names the file and the checkpoint to use instead.

    ``need_model=False`` (``preftune report``): the model files are not hashed, only the records
    (:data:`RUN_RECORD_FILES`) and ``run_complete.json``; an unfinished run is returned with
    ``complete=None``. A folder without a manifest (a plain ``save_pretrained`` folder, a run from a
    preftune before manifests) is returned with status ``unverified``.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise PreftuneError(f"folder {str(path)!r} not found")
    if not folder.is_dir():
        raise PreftuneError(f"{str(path)!r} is a file; pass the folder that holds the run or model")
    status = folder_status(folder, contents=True, only=None if need_model else RUN_RECORD_FILES)
    if status.state == "damaged":
        raise PreftuneError(f"{str(folder)!r}: {status.detail}; {_where_to_go(status)}")
    if status.state == "incomplete" and need_model:
        raise PreftuneError(f"{str(folder)!r}: {status.detail}, so its model files may be partial; {_where_to_go(status)}")
    kind = model_kind(folder)
    if need_model and kind is None:
        raise PreftuneError(_no_model_message(folder))
    complete = None
    if (folder / RUN_COMPLETE_FILE).exists():
        complete, _ = read_sealed_json(folder / RUN_COMPLETE_FILE)
        complete = {k: v for k, v in (complete or {}).items() if k != "manifest"} or None
    return RunFolder(folder, status, kind, read_run_config(folder), complete)
