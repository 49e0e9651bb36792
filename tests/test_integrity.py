"""Manifests, markers, resume that skips damaged checkpoints, rotation after marking, and real SIGKILLs.

The fault-injection matrix over real runs is in test_fault_injection.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.integrity import build_manifest, check_manifest, file_digest
from preftune.rundir import (
    CHECKPOINT_COMPLETE_MARKER,
    checkpoint_status,
    find_latest_checkpoint,
    list_checkpoints,
    open_run,
    read_sealed_json,
    resolve_resume,
    write_json,
)
from preftune.saving import mark_checkpoint_complete, rotate_checkpoints, staged_final_model, writes_fail_cleanly

from conftest import REPO

HERE = Path(__file__).resolve().parent


def _checkpoint(run: Path, step: int, size: int = 1000) -> Path:
    """A checkpoint-like folder (weights, optimizer, trainer state), marked complete."""
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(size))
    (path / "optimizer.pt").write_bytes(os.urandom(2 * size))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert mark_checkpoint_complete(path, step)
    return path


def test_manifest_names_every_kind_of_damage_and_ignores_files_added_later(tmp_path):
    import xxhash

    data = os.urandom((8 << 20) + 3)  # crosses file_digest's 8 MiB read size
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text('{"a": 1}')
    assert file_digest(tmp_path / "w.bin") == xxhash.xxh3_128(data).hexdigest()  # chunked == one-shot
    manifest = build_manifest(tmp_path, ["w.bin", "sub/c.json"])
    assert manifest["files"]["w.bin"]["size"] == len(data)
    assert check_manifest(tmp_path, manifest).ok
    (tmp_path / "eval.json").write_text("{}")  # written later by another command: not part of the run
    assert check_manifest(tmp_path, manifest).ok

    flipped = bytearray(data)
    flipped[12345] ^= 1  # one bit
    (tmp_path / "w.bin").write_bytes(bytes(flipped))
    problem = check_manifest(tmp_path, manifest).problems[0]
    assert problem.file == "w.bin" and "at the recorded size" in problem.describe()
    assert check_manifest(tmp_path, manifest, contents=False).ok  # sizes only: blind to a flipped bit (documented)

    (tmp_path / "w.bin").write_bytes(data[:100])
    assert check_manifest(tmp_path, manifest, contents=False).problems[0].describe() == (
        f"w.bin is damaged (found 100 bytes; expected {len(data):,} bytes)")
    (tmp_path / "sub" / "c.json").unlink()
    problems = check_manifest(tmp_path, manifest).problems
    assert [p.file for p in problems] == ["sub/c.json", "w.bin"] and problems[0].describe() == "sub/c.json is missing (expected 8 bytes)"


def test_sealed_record_notices_a_changed_byte_and_reads_records_from_before_sealing(tmp_path):
    path = write_json(tmp_path / "r.json", {"final_metrics": {"loss": 0.25}, "manifest": {"algorithm": "xxh3_128", "files": {}}}, seal=True)
    data, problem = read_sealed_json(path)
    assert problem is None and data["final_metrics"] == {"loss": 0.25} and "checksum" not in data
    path.write_text(path.read_text().replace("0.25", "0.35"))  # still valid JSON, another value
    assert read_sealed_json(path) == (None, "its checksum does not match its content")
    path.write_text('{"final_metrics": {}, "demo": false}')  # a record from before manifests
    assert read_sealed_json(path) == ({"final_metrics": {}, "demo": False}, None)
    assert not list(tmp_path.glob("*.tmp"))


def test_latest_skips_damaged_checkpoints_saying_why_and_an_explicit_one_names_the_file(tmp_path, caplog):
    run = tmp_path
    for step in (2, 4, 6):
        _checkpoint(run, step)
    assert checkpoint_status(run / "checkpoint-6").state == "ok"
    (run / "checkpoint-6" / "optimizer.pt").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        assert resolve_resume("latest", run) == str(run / "checkpoint-4")
    assert f"skipping {run / 'checkpoint-6'}: optimizer.pt is damaged (found 10 bytes; expected 2,000 bytes)" in caplog.text
    with pytest.raises(PreftuneError) as stop:
        resolve_resume(str(run / "checkpoint-6"), run)
    assert str(stop.value) == (f"--resume_from_checkpoint {str(run / 'checkpoint-6')!r}: optimizer.pt is damaged (found 10 bytes; expected 2,000 bytes); "
                               f"the newest good checkpoint is {str(run / 'checkpoint-4')!r} (pass it, or --resume_from_checkpoint latest)")
    (run / "checkpoint-4" / CHECKPOINT_COMPLETE_MARKER).write_text((run / "checkpoint-4" / CHECKPOINT_COMPLETE_MARKER).read_text().replace("1000", "1001"))
    assert checkpoint_status(run / "checkpoint-4").detail == "its .complete marker is damaged (its checksum does not match its content)"
    assert find_latest_checkpoint(run) == run / "checkpoint-2"
    (run / "checkpoint-2" / "model.safetensors").unlink()
    with pytest.raises(PreftuneError, match=r"no complete checkpoint-\* folder in .* verifies \(checkpoint-6: optimizer.pt is damaged"):
        resolve_resume("latest", run)


def test_rotation_happens_after_marking_and_keeps_only_checkpoints_that_verify(tmp_path):
    run = tmp_path
    for step in (2, 4, 6, 8):
        _checkpoint(run, step)
    (run / "checkpoint-6" / "model.safetensors").write_bytes(b"short")  # damaged
    (run / "checkpoint-4" / CHECKPOINT_COMPLETE_MARKER).unlink()  # incomplete
    _checkpoint(run, 12)  # left by an earlier run that went further: not ours to delete
    (run / ".discarding-checkpoint-1").mkdir()  # a kill in the middle of an earlier deletion
    deleted = rotate_checkpoints(run, keep_last=2, newest_step=8)
    assert sorted(p.name for p in deleted) == ["checkpoint-4", "checkpoint-6"]
    assert [p.name for _, p in list_checkpoints(run)] == ["checkpoint-12", "checkpoint-8", "checkpoint-2"]
    assert not list(run.glob(".discarding-*"))
    assert rotate_checkpoints(run, keep_last=1, newest_step=8, protect=run / "checkpoint-2") == []  # the best one is kept


def test_trainer_rotates_only_after_the_new_checkpoint_is_marked(tmp_path):
    """With save_total_limit=1 transformers would delete checkpoint-N-1 inside _save_checkpoint, before
    on_save: an observer running before preftune's marker callback would then see only checkpoint-N."""
    from transformers import TrainerCallback

    from preftune.config import PreftuneConfig
    from preftune.trainer import PreferenceTrainer
    from test_trainer import random_pairs

    from conftest import tiny_llama

    seen = {}

    class Observer(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = sorted((p.name, (p / CHECKPOINT_COMPLETE_MARKER).exists()) for _, p in list_checkpoints(args.output_dir))

    args = PreftuneConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2, disable_tqdm=True, max_steps=3,
                          save_strategy="steps", save_steps=1, save_total_limit=1, logging_steps=100)
    trainer = PreferenceTrainer(model=tiny_llama(), args=args, train_pairs=random_pairs(8), pad_token_id=0, callbacks=[Observer()])
    trainer.train()
    assert seen[2] == [("checkpoint-1", True), ("checkpoint-2", False)]  # the good one is still there while 2 is unmarked
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint-3"] and checkpoint_status(tmp_path / "checkpoint-3").state == "ok"
    assert args.save_total_limit == 1  # restored after training


def test_a_failed_final_save_leaves_no_file_of_the_attempt_and_other_errors_pass_through(tmp_path):
    out = tmp_path
    (out / "model.safetensors").write_bytes(b"previous")

    with pytest.raises(PreftuneError, match=r"could not write the final model in .* \(No space left on device: model.safetensors; .* GB free"):
        with writes_fail_cleanly(out, "the final model"), staged_final_model(out) as staged:
            (staged.folder / "model.safetensors").write_bytes(b"half")
            raise OSError(28, "No space left on device", str(staged.folder / "model.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"] and (out / "model.safetensors").read_bytes() == b"previous"

    with pytest.raises(ZeroDivisionError):  # not a failed checkpoint write: unchanged
        with writes_fail_cleanly(out, "a checkpoint", partial_checkpoint=lambda: out / "checkpoint-3"):
            1 / 0
    _checkpoint(out, 3)
    with pytest.raises(ZeroDivisionError):  # checkpoint-3 is marked: the error came after it was written
        with writes_fail_cleanly(out, "a checkpoint", partial_checkpoint=lambda: out / "checkpoint-3"):
            1 / 0
    assert (out / "checkpoint-3").is_dir()
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"half")  # an older checkpoint-3 being written again
    with pytest.raises(PreftuneError, match=r"could not write checkpoint-3 .*removed the partial checkpoint-3"):
        with writes_fail_cleanly(out, "a checkpoint", partial_checkpoint=lambda: out / "checkpoint-3"):
            raise OSError(27, "File too large")
    assert not (out / "checkpoint-3").exists() and not list(out.glob(".discarding-*"))


def test_a_folder_without_manifest_that_fails_to_load_still_ends_in_one_line(tmp_path):
    from conftest import tiny_llama
    from preftune.demo import build_demo_tokenizer
    from preftune.inference_model import load_pretrained

    tiny_llama().save_pretrained(tmp_path)
    build_demo_tokenizer().save_pretrained(tmp_path)
    assert open_run(tmp_path).status.state == "unverified"
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:7])
    with pytest.raises(PreftuneError) as stop:
        load_pretrained(str(tmp_path))
    assert "\n" not in str(stop.value) and "cannot load the" in str(stop.value) and str(tmp_path) in str(stop.value)


# --- real SIGKILLs at random points of a save ---------------------------------------------------------
KILL_CHILD = r"""
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from conftest import tiny_llama
from preftune.config import PreftuneConfig
from preftune.layout import PairTokens
from preftune.trainer import PreferenceTrainer

pairs = [PairTokens([1, 5 + i % 7, 6], [7, 8, 2], [9, 10 + i % 5, 2], example_id=i) for i in range(64)]
model = tiny_llama()  # built once; every forked run starts from a copy
args = PreftuneConfig(output_dir="unset", report_to="none", per_device_train_batch_size=4, max_steps=10000, save_strategy="steps",
                      save_steps=1, save_total_limit=2, logging_steps=10000, disable_tqdm=True, learning_rate=1e-3, memory_preflight=False)
for line in sys.stdin:  # the test names the next run folder, kills the process we fork, and asks again
    pid = os.fork()
    if pid == 0:  # a run that writes a checkpoint after every step, keeping 2 (rotation at every save)
        try:
            args.output_dir = line.strip()
            PreferenceTrainer(model=model, args=args, train_pairs=pairs, pad_token_id=0).train()
        finally:
            os._exit(0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def _wait_for(path: Path, deadline: float) -> float:
    while not path.exists():
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.002)
    return time.perf_counter()


def _loads(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    load_file(str(checkpoint / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.load(checkpoint / name, weights_only=False)
    json.loads((checkpoint / "trainer_state.json").read_text())


def test_sigkill_at_random_points_of_saves_never_leaves_latest_without_an_intact_checkpoint(tmp_path):
    """SIGKILL sent by this test at a random moment within ~2 save cycles of a run that saves after every
    step: every marked checkpoint verifies, and ``latest`` picks one that loads. PREFTUNE_KILL_TRIALS
    raises the number of kills (docs/reliability.md records a longer run)."""
    trials = int(os.environ.get("PREFTUNE_KILL_TRIALS", "6"))
    seed = int(os.environ.get("PREFTUNE_KILL_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(HERE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    during_save = 0
    try:
        for trial in range(trials):
            out = tmp_path / f"run{trial}"
            child.stdin.write(f"{out}\n")
            child.stdin.flush()
            pid = int(child.stdout.readline())
            deadline = time.time() + 120
            first = _wait_for(out / "checkpoint-1", deadline)
            cycle = _wait_for(out / "checkpoint-2", deadline) - first  # one step + one save
            time.sleep(rng.uniform(0, 2 * cycle))
            os.kill(pid, signal.SIGKILL)
            assert child.stdout.readline().strip() == "reaped"  # dead: nothing changes under the checks below
            folders = list_checkpoints(out)
            unmarked = [p for _, p in folders if not (p / CHECKPOINT_COMPLETE_MARKER).exists()]
            during_save += bool(unmarked or list(out.glob(".discarding-*")) or list(out.glob("checkpoint-*/.complete.tmp")))
            for _, path in folders:
                if path not in unmarked:
                    assert checkpoint_status(path).state == "ok", (seed, trial, path, checkpoint_status(path).detail)
            latest = find_latest_checkpoint(out)
            assert latest is not None, (seed, trial, [p.name for _, p in folders])
            _loads(latest)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    print(f"\n{trials} kills (seed {seed}): {during_save} struck while a checkpoint was being written or rotated")
    assert during_save >= 1, f"no kill landed inside a save (seed {seed}); the test did not test anything"

    from preftune.config import PreftuneConfig
    from preftune.layout import PairTokens
    from preftune.trainer import PreferenceTrainer

    from conftest import tiny_llama

    # the last killed run resumes from `latest` (True: the newest checkpoint that verifies)
    step = int(find_latest_checkpoint(out).name.split("-")[1])
    pairs = [PairTokens([1, 5 + i % 7, 6], [7, 8, 2], [9, 10 + i % 5, 2], example_id=i) for i in range(64)]
    args = PreftuneConfig(output_dir=str(out), report_to="none", per_device_train_batch_size=4, max_steps=step + 1, save_strategy="no",
                          logging_steps=10000, disable_tqdm=True, learning_rate=1e-3, memory_preflight=False)
    trainer = PreferenceTrainer(model=tiny_llama(), args=args, train_pairs=pairs, pad_token_id=0)
    assert trainer.train(resume_from_checkpoint=True).global_step == step + 1
