"""Scale out and stay up: DDP equivalence, interrupt + exact resume, determinism, preflight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.errors import PreftuneError
from preftune.reliability import largest_batch, memory_preflight
from preftune.rundir import CHECKPOINT_COMPLETE_MARKER as COMPLETE_MARKER, find_latest_checkpoint

from conftest import FP32_FLAGS, REPO, free_port

DEMO_FLAGS = ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "2e-3",
              "--warmup_steps", "0"]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def losses(run_dir):
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def world_size_seen(run_dir) -> int:
    """The number of processes the run itself trained with (rank 0 writes it in run_config.json)."""
    return json.loads((Path(run_dir) / "run_config.json").read_text())["world_size"]


def _train_in_process(argv: list[str]) -> int:
    """``preftune train`` through main() in this process, on one thread as the subprocesses (``env()``:
    OMP_NUM_THREADS=1), so its float32 results are bit-comparable with theirs; a subprocess would
    spend ~12 s importing."""
    from preftune.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["train", *argv])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, capfd, caplog):
    """2 CPU processes (gloo) x 4 pairs == 1 process x 8 pairs: same loss trajectory, outputs once.

    The 2-process run goes through the shipped recipe, examples/cpu_2proc.sh (torchrun), and the
    run itself must report a world size of 2: equal outputs from a launcher that silently started
    one process (as `accelerate launch` does on CPU) would prove nothing."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--max_steps", "6", "--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "2e-3", "--warmup_steps", "0",
              *FP32_FLAGS]  # fp32: bf16 rounds 2 x 4 pairs and 8 pairs differently (rel 1e-5 is an fp32 tolerance)
    code = _train_in_process(["--output_dir", str(single), "--per_device_train_batch_size", "8", *common])
    single_err = capfd.readouterr().err + caplog.text
    assert code == 0, single_err[-2000:]
    recipe_env = dict(env(), PYTHON=sys.executable, PET_MASTER_PORT=str(free_port()))
    r2 = subprocess.run(["sh", str(REPO / "examples" / "cpu_2proc.sh"), "--output_dir", str(ddp), "--per_device_train_batch_size", "4", *common],
                        capture_output=True, text=True, env=recipe_env, timeout=400)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert world_size_seen(single) == 1 and world_size_seen(ddp) == 2
    assert "; 2 processes; memory: " in r2.stderr and "; 1 process; memory: " in single_err
    l1, _ = losses(single)
    l2, recs2 = losses(ddp)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4, 5, 6]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-5), step
    # the loss moved, so equal trajectories mean equal updates, not two idle runs
    assert l1[6] < l1[1]
    # written once: one record per step, one summary in stdout
    assert [r["step"] for r in recs2 if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert r2.stdout.count("saved to") == 1
    w1, w2 = weights(single), weights(ddp)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    steps = ["--max_steps", "150", "--save_steps", "1000"]
    assert _train_in_process(["--output_dir", str(full), *DEMO_FLAGS, *steps]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "preftune", "train", "--output_dir", str(cut), *DEMO_FLAGS, *steps],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and "--resume_from_checkpoint latest" in err and "Traceback" not in err
    ckpt = find_latest_checkpoint(cut)
    assert ckpt is not None and (ckpt / COMPLETE_MARKER).exists()
    stopped_at = int(ckpt.name.split("-")[1])
    assert 20 <= stopped_at < 150
    assert not (cut / "run_complete.json").exists()

    assert _train_in_process(["--output_dir", str(cut), *DEMO_FLAGS, *steps, "--resume_from_checkpoint", "latest"]) == 0
    w_full, w_cut = weights(full), weights(cut)
    diff = max((w_full[k] - w_cut[k]).abs().max().item() for k in w_full)
    assert diff <= 1e-6, diff
    l_full, _ = losses(full)
    l_cut, _ = losses(cut)
    assert l_cut[150] == pytest.approx(l_full[150], rel=1e-6)


def test_same_seed_same_weights(tmp_path):
    from preftune.commands.train import parse_train_args
    from preftune.run import run_training

    outs = []
    for name in ("a", "b"):
        m, d, a = parse_train_args(["--output_dir", str(tmp_path / name), "--max_steps", "15", "--disable_tqdm", "true"])
        run_training(m, d, a)
        outs.append(weights(tmp_path / name))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    m, d, a = parse_train_args(["--output_dir", str(tmp_path / "c"), "--max_steps", "15", "--disable_tqdm", "true", "--seed", "43"])
    run_training(m, d, a)
    other = weights(tmp_path / "c")
    assert any(not torch.equal(outs[0][k], other[k]) for k in other)  # the seed matters


def test_latest_ignores_half_written_checkpoint(tmp_path):
    good = tmp_path / "checkpoint-3"
    good.mkdir()
    (good / "trainer_state.json").write_text("{}")
    (good / COMPLETE_MARKER).write_text("3")
    half = tmp_path / "checkpoint-9"  # killed while saving: files but no marker
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    no_state = tmp_path / "checkpoint-12"
    no_state.mkdir()
    (no_state / COMPLETE_MARKER).write_text("12")
    assert find_latest_checkpoint(tmp_path) == good
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_resume_latest_without_checkpoint_is_clear(tmp_path):
    from preftune.rundir import resolve_resume

    with pytest.raises(PreftuneError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(PreftuneError, match="not a complete checkpoint folder"):
        resolve_resume(str(tmp_path), tmp_path)


def _tiny_trainer(tmp_path, **kw):
    from preftune.config import PreftuneConfig
    from preftune.trainer import PreferenceTrainer
    from test_trainer import random_pairs

    from conftest import tiny_llama

    args = PreftuneConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2, disable_tqdm=True, **kw)
    pairs = random_pairs(10)
    return PreferenceTrainer(model=tiny_llama(), args=args, train_pairs=pairs, pad_token_id=0), pairs


def test_preflight_picks_longest_and_leaves_state(tmp_path):
    trainer, pairs = _tiny_trainer(tmp_path)
    longest = largest_batch(pairs, 2)
    assert [p.packed_length for p in longest] == sorted((p.packed_length for p in pairs), reverse=True)[:2]
    by_tokens = largest_batch(pairs, 8, max_tokens_per_batch=longest[0].packed_length + 1)
    assert len(by_tokens) == 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rng = torch.get_rng_state()
    memory_preflight(trainer, pairs)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_preflight_out_of_memory_suggests_fix(tmp_path, monkeypatch):
    trainer, pairs = _tiny_trainer(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")

    monkeypatch.setattr(trainer, "sequence_logps", boom)
    with pytest.raises(PreftuneError, match=r"out of memory on the largest batch.*--max_tokens_per_batch.*--selective_checkpointing true.*--gradient_checkpointing"):
        memory_preflight(trainer, pairs)
    # the advice names only what the run does not use yet
    monkeypatch.setattr(trainer.args, "selective_checkpointing", "true")
    with pytest.raises(PreftuneError) as raised:
        memory_preflight(trainer, pairs)
    assert "--selective_checkpointing" not in str(raised.value) and "--gradient_checkpointing true (least memory)" in str(raised.value)
    monkeypatch.setattr(trainer.args, "gradient_checkpointing", True)
    with pytest.raises(PreftuneError) as raised:
        memory_preflight(trainer, pairs)
    assert "is on already" in str(raised.value) and "pass --gradient_checkpointing" not in str(raised.value)
    monkeypatch.setattr(trainer, "sequence_logps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not disguised as OOM
        memory_preflight(trainer, pairs)


def test_token_budget_run_interrupted_in_a_later_epoch_resumes_exactly(tmp_path):
    """--max_tokens_per_batch: a run stopped by SIGTERM in its second epoch and resumed from the
    checkpoint ends with the weights of the uninterrupted run (same batches, same order, each epoch)."""
    from transformers import TrainerCallback

    from preftune.config import PreftuneConfig
    from preftune.reliability import CheckpointMarkerCallback, InterruptCallback
    from preftune.trainer import PreferenceTrainer
    from test_trainer import random_pairs

    from conftest import tiny_llama

    pairs = random_pairs(40)

    class SigtermAt(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                os.kill(os.getpid(), signal.SIGTERM)  # caught by InterruptCallback: save, then stop

    def trainer(out, *callbacks):
        args = PreftuneConfig(output_dir=str(out), report_to="none", max_tokens_per_batch=60, num_train_epochs=3, disable_tqdm=True,
                              learning_rate=3e-3, save_strategy="no", logging_steps=1, seed=11, use_cpu=True)
        return PreferenceTrainer(model=tiny_llama(seed=2), args=args, train_pairs=pairs, pad_token_id=0, callbacks=list(callbacks))

    full = trainer(tmp_path / "full")
    full.train()
    steps_per_epoch = len(full.get_train_dataloader())
    assert full.state.global_step == 3 * steps_per_epoch
    stop_at = steps_per_epoch + 3  # inside the second epoch

    interrupt = InterruptCallback()
    cut = trainer(tmp_path / "cut", SigtermAt(stop_at), interrupt, CheckpointMarkerCallback())
    cut.train()
    assert interrupt.received == signal.SIGTERM and cut.state.global_step == stop_at
    ckpt = find_latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and ckpt.name == f"checkpoint-{stop_at}"

    resumed = trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == full.state.global_step
    want = dict(full.model.named_parameters())
    diff = max((p - want[n]).abs().max().item() for n, p in resumed.model.named_parameters())
    assert diff <= 1e-6, diff
    start = dict(tiny_llama(seed=2).named_parameters())
    assert max((p - start[n]).abs().max().item() for n, p in want.items()) > 1e-2  # the weights moved


# --- resuming a multi-process run ---------------------------------------------------------------------
def _tiny_user_run(tmp_path) -> list[str]:
    """A tiny Llama saved as a model folder and 64 pairs: the options of a run that records its command."""
    from preftune.demo import build_demo_tokenizer

    from conftest import tiny_llama

    model, data = tmp_path / "model", tmp_path / "prefs.jsonl"
    tok = build_demo_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=0).save_pretrained(model)
    tok.save_pretrained(model)
    data.write_text("".join(json.dumps({"prompt": f"Q: copy {i % 10} A:", "chosen": f" {i % 10}", "rejected": f" {(i + 1) % 10}"}) + "\n"
                            for i in range(64)))
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
            "--memory_preflight", "false", "--logging_steps", "1", "--learning_rate", "1e-3", "--save_steps", "1000", *FP32_FLAGS]


def _worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun (pid ``launcher``) started, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if ppid == launcher and rank is not None:
            found[rank] = int(stat.parent.name)
    return found


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_two_process_run_stops_together_says_so_once_and_resumes_only_with_two(tmp_path, capfd, caplog):
    """SIGTERM to ONE of torchrun's two processes (rank 1): both stop after the same step and save one
    complete checkpoint (recorded as written by 2 processes); the interrupt is printed once, with the
    torchrun command that resumes it. A one-process resume is refused in one line naming both sizes and
    that command, before anything is written; with --allow_world_size_change true it trains on with one
    warning naming the global batch before and after."""
    from preftune.rundir import checkpoint_origin

    flags, out = _tiny_user_run(tmp_path), tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              "-m", "preftune", "train", "--output_dir", str(out), "--max_steps", "400", *flags]
    proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None, err[-3000:]
    assert 5 <= int(ckpt.name.split("-")[1]) < 400
    origin = checkpoint_origin(ckpt)
    assert (origin.world_size, origin.nodes, origin.per_device_train_batch_size) == (2, 1, 4)
    assert err.count("preftune: interrupted by SIGTERM") == 1, err[-3000:]
    assert f"Resume with: torchrun --nproc_per_node 2 -m preftune train --output_dir {out} --resume_from_checkpoint latest" in err
    assert err.count("received SIGTERM") == 1  # process 0's notice that another process got it

    # the one-process resumes run in this process (main() is what the console script calls): each
    # subprocess would spend ~12 s importing
    from preftune.cli import main

    before = _folder_bytes(out)
    code = main(["train", "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("preftune: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{ckpt.name} was written by 2 processes and this run has 1 process" in lines[0]
    assert "from 8 (4 x 1 x 2) to 4 (4 x 1 x 1)" in lines[0] and "data position" in lines[0]
    assert f"`torchrun --nproc_per_node 2 -m preftune train --output_dir {out} --resume_from_checkpoint latest`" in lines[0]
    assert "--allow_world_size_change true" in lines[0]
    assert _folder_bytes(out) == before  # nothing written, nothing removed

    stop = int(ckpt.name.split("-")[1]) + 2
    caplog.clear()
    code = main(["train", "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--allow_world_size_change", "true",
                 "--max_steps", str(stop)])
    err = capfd.readouterr().err + caplog.text  # in process, pytest's log capture holds the warnings
    assert code == 0, err[-2000:]
    assert err.count("--allow_world_size_change: resuming") == 1
    assert "changes from 8 (4 x 1 x 2) to 4 (4 x 1 x 1)" in err
    assert world_size_seen(out) == 1 and (out / "run_complete.json").exists()
    assert checkpoint_origin(out / f"checkpoint-{stop}").world_size == 1
    # the permission was for this resume only: the next one does not replay it
    assert "--allow_world_size_change" not in json.dumps(json.loads((out / "run_config.json").read_text())["command"])


def test_a_signal_arriving_during_the_agreement_waits_for_the_next_step(monkeypatch):
    """The stop is decided on the agreed value alone. A signal handled while the all-reduce runs (a
    process blocked in it handles the signal the moment it returns) must not make this process save
    while the others, which agreed on "no signal", train on: both would wait for each other forever
    (seen under torchrun: rank 1 in the checkpoint's all-gather, rank 0 in the next step's)."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    import preftune.reliability as reliability

    callback = reliability.InterruptCallback()
    args = SimpleNamespace(device="cpu")

    def agreement_during_which_the_signal_lands(received, device):
        callback.received = signal.SIGTERM  # the handler runs as the blocking call returns
        return received  # every process contributed "none": the agreed value is None

    monkeypatch.setattr(reliability, "agree_on_signal", agreement_during_which_the_signal_lands)
    control = callback.on_step_end(args, None, TrainerControl())
    assert not control.should_save and not control.should_training_stop
    monkeypatch.setattr(reliability, "agree_on_signal", lambda received, device: received)  # the next step end
    control = callback.on_step_end(args, None, TrainerControl())
    assert control.should_save and control.should_training_stop
