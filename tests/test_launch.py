"""How a run was launched: the command that resumes it as it was started, the world size its
checkpoints record, and the permission to change it (the multi-process runs themselves:
test_reliability.py::test_a_two_process_run_stops_together_says_so_once_and_resumes_only_with_two)."""

from __future__ import annotations

import json

import pytest

from preftune.commands.train import TrainCommand
from preftune.launch import Launch, current_launch, describe_global_batch, resume_options
from preftune.rundir import TRAINER_STATE_FILE, checkpoint_origin
from preftune.saving import mark_checkpoint_complete


def test_the_resume_command_starts_the_same_launch_again():
    flags = resume_options("out dir")
    assert flags == "--output_dir 'out dir' --resume_from_checkpoint latest"
    assert Launch(1).resume_command(flags) == "preftune train --output_dir 'out dir' --resume_from_checkpoint latest"
    assert Launch(2).resume_command(flags) == "torchrun --nproc_per_node 2 -m preftune train --output_dir 'out dir' --resume_from_checkpoint latest"
    several = Launch(8, nodes=2).resume_command(flags)
    assert several.startswith("on each of the 2 nodes, its usual launch command (4 processes per node")
    assert several.endswith("with --output_dir 'out dir' --resume_from_checkpoint latest")
    via_accelerate = Launch(4, launcher="accelerate").resume_command(flags)
    assert via_accelerate.startswith("your accelerate launch command (4 processes") and via_accelerate.endswith(flags)
    assert resume_options(None) == "... --resume_from_checkpoint latest"  # a folder that did not record its command
    assert Launch(8, nodes=2).describe() == "8 processes on 2 nodes" and Launch(1).describe() == "1 process"


@pytest.mark.parametrize("variables, launch", [
    ({}, Launch(1)),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}, Launch(2)),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"}, Launch(8, 2)),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, Launch(8, 2)),  # a launcher without torchrun's GROUP_WORLD_SIZE
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}, Launch(2, 1, "accelerate")),
])
def test_the_number_of_nodes_comes_from_the_launchers_variables(monkeypatch, variables, launch):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert current_launch(launch.world_size) == launch


def test_global_batch_is_per_device_times_accumulation_times_processes():
    assert describe_global_batch(4, 2, 2) == "16 (4 x 2 x 2)"
    assert describe_global_batch(4, 1, 2, tokens=512) == "1024 tokens (512 x 1 x 2)"
    assert describe_global_batch(None, None, 2) == "? x ? x 2"


def _checkpoint(run, *rng_files: str):
    ckpt = run / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE_FILE).write_text(json.dumps({"global_step": 4, "train_batch_size": 3}))
    for name in rng_files:
        (ckpt / name).write_bytes(b"rng")
    return ckpt


def test_a_checkpoint_records_the_launch_it_was_written_by(tmp_path):
    ckpt = _checkpoint(tmp_path, "rng_state_0.pth", "rng_state_1.pth")
    origin = {"world_size": 2, "nodes": 1, "launcher": "accelerate", "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
              "max_tokens_per_batch": None}
    assert mark_checkpoint_complete(ckpt, 4, origin)
    got = checkpoint_origin(ckpt)
    assert (got.world_size, got.nodes, got.launcher, got.per_device_train_batch_size, got.gradient_accumulation_steps, got.max_tokens_per_batch) \
        == (2, 1, "accelerate", 3, 2, None)


def test_a_checkpoint_marked_before_the_launch_was_recorded_tells_it_by_its_rng_files(tmp_path):
    """transformers writes one rng_state_<rank>.pth per process when there are several, else rng_state.pth."""
    two = _checkpoint(tmp_path / "a", "rng_state_0.pth", "rng_state_1.pth")
    assert mark_checkpoint_complete(two, 4)  # a marker without the launch
    assert (checkpoint_origin(two).world_size, checkpoint_origin(two).per_device_train_batch_size) == (2, 3)
    one = _checkpoint(tmp_path / "b", "rng_state.pth")
    (one / ".complete").write_text("4")  # the oldest marker: the step only
    assert checkpoint_origin(one).world_size == 1
    assert checkpoint_origin(_checkpoint(tmp_path / "c")) is None  # nothing tells: not checked


def test_the_permission_to_change_the_world_size_is_not_recorded_for_the_next_resume():
    argv = ["--model_name_or_path", "m", "--resume_from_checkpoint", "latest", "--allow_world_size_change", "--max_steps", "4",
            "--allow-world-size-change=true", "--seed", "3", "--allow_world_size_change", "true"]
    record = TrainCommand(argv, {"allow_world_size_change": True, "beta": 0.2}).as_record()
    assert record == {"argv": ["--model_name_or_path", "m", "--max_steps", "4", "--seed", "3"], "config_options": {"beta": 0.2}}
