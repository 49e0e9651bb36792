"""The run folder: the name of every file a run writes, and the rules for reading and writing them.

This module is the one place that knows the layout of a ``preftune train`` output folder::

    OUT/
      run_config.json            model, data and training settings (written before training)
      metrics.jsonl              one JSON object per log event (appended during training)
      samples.jsonl              greedy answers to fixed held-out prompts per evaluation (--eval_generate)
      checkpoint-N/              Trainer checkpoints; ``.complete`` written last, once all is on disk
      ref_logps/<fp>.safetensors precomputed DPO reference log-probs (``--precompute_ref_log_probs``)
      model.safetensors ...      the trained model (full model), or adapter_*.json/.safetensors (LoRA),
                                 or reft_config.json + reft_interventions.safetensors (ReFT)
      tokenizer files
      training_curves.png        curves drawn from metrics.jsonl
      README.md                  model card
      run_complete.json          written last: the run finished (final metrics, seconds)
      eval.json, generations.*   written by ``preftune eval``
      report.html                written by ``preftune report``

Other modules import the names below instead of spelling file names themselves.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .errors import PreftuneError

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_CONFIG_FILE", "RUN_COMPLETE_FILE", "METRICS_FILE", "CURVES_FILE", "MODEL_CARD_FILE", "EVAL_FILE",
    "GENERATIONS_JSONL", "GENERATIONS_MD", "REPORT_FILE", "SAMPLES_FILE", "REF_CACHE_DIR", "CHECKPOINT_COMPLETE_MARKER",
    "TRAINER_STATE_FILE", "MODEL_CONFIG_FILE", "ADAPTER_CONFIG_FILE", "REFT_CONFIG_FILE", "REFT_WEIGHTS_FILE",
    "TOKENIZER_FILES", "check_output_dir", "list_checkpoints", "find_latest_checkpoint", "mark_checkpoint_complete",
    "resolve_resume", "read_json", "write_json", "read_run_config", "model_kind",
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
# --- what the saved model consists of (one of three kinds) -----------------------------------------
MODEL_CONFIG_FILE = "config.json"  # a full model (save_pretrained)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a LoRA/DoRA adapter (peft)
REFT_CONFIG_FILE = "reft_config.json"  # ReFT interventions
REFT_WEIGHTS_FILE = "reft_interventions.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# --- what the after-training commands write ---------------------------------------------------------
EVAL_FILE = "eval.json"
GENERATIONS_JSONL = "generations.jsonl"
GENERATIONS_MD = "generations.md"
REPORT_FILE = "report.html"

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON through a temporary file and ``os.replace``: a reader (or a
    crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


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
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".preftune_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PreftuneError(f"cannot write to output_dir {str(out)!r}: {e.strerror or e}") from None
    return out


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder in ``output_dir`` as ``(N, path)``, newest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` was completely written (its marker exists, written after everything else)."""
    return (path / CHECKPOINT_COMPLETE_MARKER).exists() and (path / TRAINER_STATE_FILE).exists()


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was completely written, or None."""
    for _, path in list_checkpoints(output_dir):
        if is_complete_checkpoint(path):
            return path
        logger.warning("ignoring incomplete checkpoint %s (interrupted while saving)", path)
    return None


def _fsync_files(folder: Path) -> None:
    """fsync every file in ``folder`` so a marker written afterwards never precedes the data on disk."""
    for p in folder.iterdir():
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass


def mark_checkpoint_complete(checkpoint: Path, step: int) -> bool:
    """Write ``checkpoint/.complete`` (fsynced, after fsyncing the checkpoint's files).

    Returns False (and writes nothing) when the checkpoint lacks the Trainer's state file, i.e. the
    Trainer did not finish writing it.
    """
    if not (checkpoint.is_dir() and (checkpoint / TRAINER_STATE_FILE).exists()):
        return False
    _fsync_files(checkpoint)
    with open(checkpoint / CHECKPOINT_COMPLETE_MARKER, "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    return True


def resolve_resume(value: str | None, output_dir: Path) -> str | None:
    """``--resume_from_checkpoint``: None, ``latest`` (the newest complete checkpoint) or a folder."""
    if not value:
        return None
    if str(value) == "latest":
        last = find_latest_checkpoint(output_dir)
        if last is None:
            raise PreftuneError(f"--resume_from_checkpoint latest: no complete {CHECKPOINT_PREFIX}* folder in {str(output_dir)!r}")
        logger.info("resuming from %s", last)
        return str(last)
    path = Path(value)
    if not (path.is_dir() and (path / TRAINER_STATE_FILE).exists()):
        raise PreftuneError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no {TRAINER_STATE_FILE})")
    return str(path)
