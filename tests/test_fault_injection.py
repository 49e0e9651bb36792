"""Fault injection: every file of a checkpoint and of a finished run, damaged four ways.

Three real runs (full, LoRA + DPO with a reference cache, ReFT; tests/_faults.py) are trained once
per module. Every case (file x truncate/zero/delete/flip) is checked here at the verification
level: an explicit resume from the damaged checkpoint stops in one line naming the file and
checkpoint-4, ``latest`` picks checkpoint-4, a reader of the damaged run stops in one line naming
the file. A representative subset really resumes (or reads) and compares final weights with the
undisturbed run; benchmarks/fault_matrix.py does that for every case (table in docs/reliability.md).
Also here: the issue's two cases through the CLI, every reading command on a damaged folder, and
writes that fail (a real file-size limit in a child process).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _faults import KINDS, MODES, Case, cases_for, damage, final_weights, run_case, same_weights, train, write_inputs
from conftest import REPO


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(inputs, {kind: undisturbed run folder}) — each a 6-step run with checkpoints 2, 4, 6."""
    import torch

    root = tmp_path_factory.mktemp("faults")
    inputs = write_inputs(root)
    folders = {}
    # one thread, as conftest's autouse fixture gives each test: the resumed runs must match these
    # bitwise, and a matmul's summation order may change with the thread count
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in KINDS:
            code, err = train(root / kind, *inputs, kind)
            assert code == 0, err[-2000:]
            folders[kind] = root / kind
    finally:
        torch.set_num_threads(before)
    return inputs, folders


def _check_all(runs, tmp_path, kind: str, where: str) -> dict[str, list[str]]:
    inputs, folders = runs
    cases = [c for c in cases_for(kind, folders[kind]) if c.where == where]
    outcomes: dict[str, list[str]] = {}
    for i, case in enumerate(cases):
        try:
            outcome = run_case(case, folders[kind], tmp_path / f"case{i}", inputs, resume=False)
        except AssertionError as e:
            raise AssertionError(f"{case.id}: {e}") from e
        outcomes.setdefault(case.file, []).append(outcome)
    return outcomes


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_checkpoint_file_damaged_four_ways_is_skipped_by_latest_and_named_when_explicit(runs, tmp_path, kind):
    outcomes = _check_all(runs, tmp_path, kind, "checkpoint")
    weights = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "reft": "model.safetensors"}[kind]
    must_cover = {weights, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "tokenizer.json", "training_args.bin", ".complete"}
    assert must_cover <= set(outcomes), sorted(outcomes)
    assert all(len(v) == len(MODES) for v in outcomes.values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_file_of_a_finished_run_damaged_four_ways_stops_readers_in_one_line(runs, tmp_path, kind):
    outcomes = _check_all(runs, tmp_path, kind, "run")
    weights = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "reft": "reft_interventions.safetensors"}[kind]
    config = {"full": "config.json", "lora": "adapter_config.json", "reft": "reft_config.json"}[kind]
    assert {weights, config, "tokenizer.json", "run_config.json", "metrics.jsonl", "run_complete.json"} <= set(outcomes)
    assert outcomes["README.md"] == ["not read back: every command works as before"] * len(MODES)


def test_every_damage_to_the_reference_cache_is_noticed(runs, tmp_path):
    outcomes = _check_all(runs, tmp_path, "lora", "cache")
    assert len(outcomes) == 1 and len(next(iter(outcomes.values()))) == len(MODES)


REAL_CASES = [  # resumed for real (the truncated weights: below); benchmarks/fault_matrix.py resumes every case
    Case("full", "checkpoint", "optimizer.pt", "flip"),
    # peft's save updates the README.md it finds in checkpoint-6 when the run writes it again: the
    # damaged folder must be gone first (it was not, before the full matrix found it)
    Case("lora", "checkpoint", "README.md", "flip"),
    Case("reft", "checkpoint", "model.safetensors", "zero"),  # a ReFT checkpoint holds the interventions here
    Case("lora", "cache", "*", "flip"),
]


@pytest.mark.parametrize("case", REAL_CASES, ids=[c.id for c in REAL_CASES])
def test_resume_after_damage_continues_from_the_newest_good_checkpoint_with_identical_weights(runs, tmp_path, case):
    inputs, folders = runs
    if case.file == "*":
        case = next(c for c in cases_for(case.kind, folders[case.kind]) if c.where == case.where and c.mode == case.mode)
    outcome = run_case(case, folders[case.kind], tmp_path / "run", inputs, resume=True)
    assert "final weights identical" in outcome
    if case.kind != "reft":  # identical weights mean something: the two steps after checkpoint-4 moved them
        assert not same_weights(final_weights(folders[case.kind] / "checkpoint-4", case.kind), final_weights(tmp_path / "run", case.kind))


# --- the two cases, through the command line -------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("preftune: error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err[-5:]
    return errors[0]


def test_resume_latest_skips_truncated_newest_checkpoint_and_says_why(runs, tmp_path, caplog):
    inputs, folders = runs
    run = tmp_path / "run"
    shutil.copytree(folders["full"], run)
    size = (run / "checkpoint-6" / "model.safetensors").stat().st_size
    damage(run / "checkpoint-6" / "model.safetensors", "truncate")
    with caplog.at_level("WARNING", logger="preftune"):
        code, err = train(run, *inputs, "full", "--resume_from_checkpoint", "latest")
    assert code == 0, err[-2000:]
    said = caplog.text
    assert f"skipping {run / 'checkpoint-6'}: model.safetensors is damaged (found {size // 2:,} bytes; expected {size:,} bytes)" in said
    assert f"resuming from {run / 'checkpoint-4'}" in said
    assert same_weights(final_weights(run, "full"), final_weights(folders["full"], "full"))


def test_explicit_damaged_checkpoint_stops_in_one_line_naming_file_and_good_checkpoint(runs, tmp_path, capsys):
    from preftune.cli import main

    inputs, folders = runs
    run = tmp_path / "run"
    shutil.copytree(folders["full"], run)
    damage(run / "checkpoint-6" / "model.safetensors", "truncate")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--model_name_or_path", str(inputs[0]), "--dataset_name", str(inputs[1]), "--output_dir", str(run),
                 "--resume_from_checkpoint", str(run / "checkpoint-6"), "--max_steps", "6"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "checkpoint-6" in line and "model.safetensors is damaged" in line and f"the newest good checkpoint is '{run / 'checkpoint-4'}'" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refused before writing anything


@pytest.mark.parametrize("command", ["eval", "chat", "merge", "export", "report", "verify"])
def test_every_reading_command_stops_in_one_line_on_a_damaged_run(runs, tmp_path, capsys, command):
    """eval/chat/merge/export on a damaged model file, report on a damaged record: one line naming
    the file, exit 2, nothing written (verify: the table and exit 1)."""
    from preftune.cli import main

    _, folders = runs
    kind = "lora" if command == "merge" else "full"
    run = tmp_path / "run"
    shutil.copytree(folders[kind], run)
    damaged = {"report": "metrics.jsonl", "merge": "adapter_model.safetensors"}.get(command, "model.safetensors")
    damage(run / damaged, "truncate")
    argv = {"eval": ["eval", str(run)], "chat": ["chat", str(run)], "merge": ["merge", str(run), "--output_dir", str(tmp_path / "merged")],
            "export": ["export", str(run), "--gguf", str(tmp_path / "m.gguf")],
            "report": ["report", str(run)], "verify": ["verify", str(run)]}[command]
    capsys.readouterr()
    code = main(argv)
    if command == "verify":
        out = capsys.readouterr().out
        assert code == 1 and "would use: checkpoint-6" in out
        assert any(line.startswith(". (the run)") and "damaged" in line and f"{damaged} is damaged" in line for line in out.splitlines()), out
        return
    assert code == 2
    line = _one_error_line(capsys)
    assert damaged in line and "is damaged" in line, line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m.gguf").exists()


def test_readers_stop_in_one_line_on_an_unfinished_or_foreign_folder(runs, tmp_path, capsys):
    from preftune.cli import main

    _, folders = runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folders["full"], unfinished)
    (unfinished / "run_complete.json").unlink()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"not": "a model"}')
    capsys.readouterr()
    assert main(["eval", str(unfinished)]) == 2
    line = _one_error_line(capsys)
    assert "did not finish (no run_complete.json)" in line and "checkpoint-6" in line and "--resume_from_checkpoint latest" in line
    assert main(["report", str(unfinished)]) == 0  # the report shows an unfinished run (with a banner)
    capsys.readouterr()
    assert main(["chat", str(foreign)]) == 2
    assert str(foreign) in _one_error_line(capsys)
    assert main(["verify", str(foreign)]) == 2
    assert "is not a run folder" in _one_error_line(capsys)


# --- writes that fail: a real file-size limit (RLIMIT_FSIZE) in a child process ----------------------
CHILD = """
import io, json, resource, signal, sys
from contextlib import redirect_stderr, redirect_stdout
from preftune.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
results = []
for limit, argv in json.loads(sys.argv[1]):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(argv)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_writes_keep_earlier_checkpoints_remove_the_partial_one_and_stop_in_one_line(runs, tmp_path):
    from preftune.errors import PreftuneError
    from preftune.rundir import open_run
    from preftune.saving import FINAL_STAGING_DIR

    inputs, folders = runs
    run = tmp_path / "run"
    shutil.copytree(folders["full"], run)
    shutil.rmtree(run / "checkpoint-6")  # as if the run had stopped after checkpoint-4
    (run / "run_complete.json").unlink()
    model_size = (run / "checkpoint-4" / "model.safetensors").stat().st_size
    optimizer_size = (run / "checkpoint-4" / "optimizer.pt").stat().st_size
    assert model_size < optimizer_size
    kept = {name: _digests(run / name) for name in ("checkpoint-2", "checkpoint-4")}
    base = ["train", "--model_name_or_path", str(inputs[0]), "--dataset_name", str(inputs[1]), "--output_dir", str(run),
            "--max_steps", "6", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-2",
            "--disable_tqdm", "true", "--report_to", "none", "--resume_from_checkpoint", "latest"]
    scenarios = [
        # checkpoint-6: model.safetensors fits under the limit, optimizer.pt does not
        ((model_size + optimizer_size) // 2, [*base, "--save_steps", "2"]),
        # no checkpoint (not even the one at the end of training); the final model.safetensors does not fit
        (model_size // 2, [*base, "--save_strategy", "no"]),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(scenarios)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt_failure, final_failure = json.loads(proc.stdout.strip().splitlines()[-1])

    for result, what in ((ckpt_failure, "could not write checkpoint-6"), (final_failure, "could not write the final model")):
        assert result["code"] == 2, result["stderr"][-2000:]
        errors = [line for line in result["stderr"].splitlines() if line.startswith("preftune: error: ")]
        assert len(errors) == 1 and "Traceback" not in result["stderr"], result["stderr"][-2000:]
        assert what in errors[0] and "file-size limit" in errors[0] and "resume from checkpoint-4" in errors[0], errors[0]
    assert "removed the partial checkpoint-6" in ckpt_failure["stderr"]
    assert not (run / "checkpoint-6").exists() and not list(run.glob(".discarding-*"))
    assert not (run / FINAL_STAGING_DIR).exists() and not (run / "run_complete.json").exists()
    assert {name: _digests(run / name) for name in kept} == kept  # earlier checkpoints and markers untouched
    with pytest.raises(PreftuneError, match="did not finish"):
        open_run(run)  # the final model of this attempt is not there, and the folder says so

    code, err = train(run, *inputs, "full", "--resume_from_checkpoint", "latest")  # space again: finish the run
    assert code == 0, err[-2000:]
    assert same_weights(final_weights(run, "full"), final_weights(folders["full"], "full"))
    assert open_run(run).status.state == "ok"
