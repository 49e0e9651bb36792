"""Fault injection on the files a run writes: shared by tests/test_fault_injection.py (a subset with
real resumes, every case checked at the verification level) and benchmarks/fault_matrix.py (every
case with a real resume or read, the table in docs/reliability.md).

Three undisturbed runs of a tiny Llama on 24 pairs, 6 steps, checkpoints at 2, 4 and 6, through the
real ``preftune train`` (in-process): ``full`` (ORPO, full fine-tune), ``lora`` (DPO + LoRA with
``--precompute_ref_log_probs``, so the folder has a reference cache) and ``reft`` (ORPO + ReFT).
Each case copies one run folder, damages one file one way, and checks what preftune does next.
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

MODES = ("truncate", "zero", "delete", "flip")
KINDS = {
    "full": [],
    "lora": ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--method", "dpo", "--precompute_ref_log_probs", "true"],
    "reft": ["--reft_layers", "0,1", "--reft_rank", "2"],
}
FINAL_WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "reft": "reft_interventions.safetensors"}
RUN_FLAGS = ["--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
             "--learning_rate", "1e-2", "--disable_tqdm", "true", "--report_to", "none"]


def damage(path: Path, mode: str) -> None:
    """Truncate to half, overwrite with zeros (same size), delete, or flip three bytes (same size)."""
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "zero":
        path.write_bytes(bytes(len(data)))
    elif mode == "delete":
        path.unlink()
    elif mode == "flip":
        flipped = bytearray(data)
        for at in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
            flipped[at] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:
        raise ValueError(mode)


def write_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama saved with the demo tokenizer, and 24 preference pairs as JSONL."""
    from conftest import tiny_llama

    from preftune.demo import build_demo_tokenizer

    model_dir, data = root / "tiny_model", root / "pairs.jsonl"
    tok = build_demo_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": f"Q: copy {i % 10} {(i * 3) % 10} A:", "chosen": f" {i % 10} {(i * 3) % 10}",
             "rejected": f" {(i + 1) % 10} {(i * 3 + 1) % 10}"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model_dir, data


def train(out: Path, model_dir: Path, data: Path, kind: str, *extra: str) -> tuple[int, str]:
    """``preftune train`` in-process; returns (exit code, stderr)."""
    from preftune.cli import main

    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
                     *RUN_FLAGS, *KINDS[kind], *extra])
    return code, err.getvalue()


def final_weights(out: Path, kind: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / FINAL_WEIGHTS[kind]))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass(frozen=True)
class Case:
    kind: str  # full / lora / reft
    where: str  # "checkpoint" (checkpoint-6), "run" (the finished run folder), "cache" (ref_logps/)
    file: str  # relative to the checkpoint / run folder
    mode: str

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.where}-{self.file}-{self.mode}"


def cases_for(kind: str, run: Path) -> list[Case]:
    """Every file of checkpoint-6 (and its marker), of the finished run (and run_complete.json, and the
    files deliberately left out of the manifest) and of the reference cache, times every mode."""
    from preftune.rundir import CHECKPOINT_COMPLETE_MARKER, REF_CACHE_DIR, RUN_COMPLETE_FILE, UNCHECKED_FILES, read_sealed_json

    marker, _ = read_sealed_json(run / "checkpoint-6" / CHECKPOINT_COMPLETE_MARKER)
    record, _ = read_sealed_json(run / RUN_COMPLETE_FILE)
    files = {"checkpoint": [*marker["manifest"]["files"], CHECKPOINT_COMPLETE_MARKER],
             "run": [*record["manifest"]["files"], RUN_COMPLETE_FILE, *UNCHECKED_FILES],
             "cache": [p.relative_to(run).as_posix() for p in sorted((run / REF_CACHE_DIR).glob("*.safetensors"))]}
    return [Case(kind, where, name, mode) for where, names in files.items() for name in names for mode in MODES]


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _names(message: str, case: Case) -> bool:
    return Path(case.file).name in message


def check_checkpoint_case(case: Case, folder: Path, resume: bool, inputs, undisturbed: Path) -> str:
    """checkpoint-6 damaged: an explicit resume from it stops in one line naming the file and
    checkpoint-4; ``latest`` resumes from checkpoint-4 (``resume``: really, with identical final weights)."""
    import pytest

    from preftune.errors import PreftuneError
    from preftune.rundir import resolve_resume

    damaged = folder / "checkpoint-6"
    with pytest.raises(PreftuneError) as stop:
        resolve_resume(str(damaged), folder)
    message = _one_line(stop.value)
    assert _names(message, case) and "checkpoint-4" in message, message
    assert resolve_resume("latest", folder) == str(folder / "checkpoint-4")
    if not resume:
        return "explicit path: one line naming the file and checkpoint-4; latest: checkpoint-4"
    code, err = train(folder, *inputs, case.kind, "--resume_from_checkpoint", "latest")
    assert code == 0, err[-2000:]
    assert same_weights(final_weights(folder, case.kind), final_weights(undisturbed, case.kind))
    return "resumed from checkpoint-4, final weights identical"


def check_run_case(case: Case, folder: Path, resume: bool) -> str:
    """The finished run damaged: readers of the model (chat, eval, merge, export) and of the records
    (report) stop in one line naming the file, or (a file nothing reads back) work as before."""
    from preftune.errors import PreftuneError
    from preftune.rundir import RUN_COMPLETE_FILE, RUN_RECORD_FILES, UNCHECKED_FILES, open_run

    def outcome(need_model: bool) -> str | None:
        try:
            open_run(folder, need_model=need_model)
        except PreftuneError as e:
            message = _one_line(e)
            assert _names(message, case), message
            return message
        return None

    model_readers, report = outcome(True), outcome(False)
    if case.file in UNCHECKED_FILES:
        assert model_readers is None and report is None
        if resume:
            from preftune.inference_model import load_pretrained

            load_pretrained(str(folder))
        return "not read back: every command works as before"
    assert model_readers is not None, "a damaged model file was not noticed"
    if case.file in RUN_RECORD_FILES or (case.file == RUN_COMPLETE_FILE and case.mode != "delete"):
        assert report is not None
        return "chat/eval/merge/export/report: one line naming the file"
    assert report is None  # the report does not need the weights (a deleted run_complete.json: an unfinished run)
    return "chat/eval/merge/export: one line naming the file; report works"


def check_cache_case(case: Case, folder: Path, resume: bool, inputs, undisturbed: Path) -> str:
    """The reference cache damaged: it is never used; a resume (from checkpoint-4) recomputes it and
    ends with identical final weights."""
    from preftune.reference import check_cache_file

    path = folder / case.file
    assert case.mode == "delete" or check_cache_file(path) is not None
    if not resume:
        return "noticed (never used); recomputed by the next run"
    code, err = train(folder, *inputs, case.kind, "--resume_from_checkpoint", str(folder / "checkpoint-4"))
    assert code == 0, err[-2000:]
    assert check_cache_file(path) is None  # rewritten, intact
    assert same_weights(final_weights(folder, case.kind), final_weights(undisturbed, case.kind))
    return "recomputed, resumed from checkpoint-4, final weights identical"


def run_case(case: Case, undisturbed: Path, scratch: Path, inputs, resume: bool) -> str:
    """Copy ``undisturbed`` to ``scratch``, damage the case's file, and check the outcome (asserts)."""
    shutil.copytree(undisturbed, scratch)
    base = scratch / "checkpoint-6" if case.where == "checkpoint" else scratch
    damage(base / case.file, case.mode)
    if case.where == "checkpoint":
        return check_checkpoint_case(case, scratch, resume, inputs, undisturbed)
    if case.where == "cache":
        return check_cache_case(case, scratch, resume, inputs, undisturbed)
    return check_run_case(case, scratch, resume)
