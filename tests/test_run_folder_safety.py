"""A run folder is only touched once training begins, a run resumes from its folder alone, and the
options that would fail mid-setup (or train nothing) stop first, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.commands.train import parse_train_args, train_command
from preftune.errors import PreftuneError
from preftune.rundir import RUN_COMPLETE_FILE, RUN_CONFIG_FILE, TRAINER_STATE_FILE, check_output_dir, read_json

from conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from preftune.demo import build_demo_tokenizer

    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_demo_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def prefs_jsonl(tmp_path):
    return write_rows(tmp_path / "prefs.jsonl", [{"prompt": f"Q: copy {i % 10} A:", "chosen": f" {i % 10}", "rejected": f" {(i + 1) % 10}"}
                                                 for i in range(16)])


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--memory_preflight", "false", *extra]


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "-1"], "--learning_rate must be >= 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--num_train_epochs", "0", "--max_steps", "-1"], "nothing to train"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
])
def test_numbers_torch_would_refuse_fail_at_parse_time(flags, message):
    with pytest.raises(PreftuneError, match=message):
        parse_train_args(["--model_name_or_path", "m", "--dataset_name", "d.jsonl", *flags])


def test_resume_from_the_folder_alone_replays_the_recorded_command(tiny_model_dir, prefs_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, prefs_jsonl, out, "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-3")) == 0
    recorded = read_json(out / RUN_CONFIG_FILE)["command"]
    assert str(tiny_model_dir) in recorded["argv"] and "--resume_from_checkpoint" not in recorded["argv"]
    (out / RUN_COMPLETE_FILE).unlink()  # as if interrupted after checkpoint-2

    # the command an interrupted run prints: only the folder and --resume_from_checkpoint
    resume = ["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--max_steps", "4"]
    model_args, data_args, args = parse_train_args(resume)
    assert model_args.model_name_or_path == str(tiny_model_dir) and data_args.dataset_name == [str(prefs_jsonl)]
    assert args.learning_rate == 1e-3 and args.max_steps == 4  # recorded options, then the flags given now
    assert main(["train", *resume]) == 0
    state = json.loads((out / "checkpoint-4" / TRAINER_STATE_FILE).read_text())
    assert state["global_step"] == 4 and (out / RUN_COMPLETE_FILE).exists()
    assert read_json(out / RUN_CONFIG_FILE)["command"]["argv"][:4] == recorded["argv"][:4]


def test_resume_of_a_run_without_a_recorded_command_is_refused_and_touches_nothing(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoint-3").mkdir(parents=True)
    record = {"base_model": "my-model", "dataset": "my.jsonl", "demo": False}
    (out / RUN_CONFIG_FILE).write_text(json.dumps(record))
    before = (out / RUN_CONFIG_FILE).read_bytes()
    with pytest.raises(PreftuneError, match="'my-model' on 'my.jsonl' that did not record its options"):
        train_command(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert main(["train", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 2
    assert (out / RUN_CONFIG_FILE).read_bytes() == before  # not overwritten by the demo's config


def test_a_new_run_does_not_write_over_an_unfinished_one(tmp_path):
    out = tmp_path / "unfinished"
    (out / "checkpoint-7").mkdir(parents=True)
    with pytest.raises(PreftuneError, match="holds an unfinished run \\(newest checkpoint: checkpoint-7\\); pass --resume_from_checkpoint latest"):
        check_output_dir(str(out), overwrite=False, resuming=False)
    for is_demo in (False, True):  # the demo neither
        with pytest.raises(PreftuneError, match="unfinished run"):
            check_output_dir(str(out), overwrite=False, resuming=False, is_demo=is_demo)
    assert check_output_dir(str(out), overwrite=True, resuming=False) == out
    assert check_output_dir(str(out), overwrite=False, resuming=True) == out


def test_overwrite_leaves_a_finished_run_alone_until_training_begins(tiny_model_dir, prefs_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, prefs_jsonl, out, "--max_steps", "1")) == 0
    finished = {name: (out / name).read_bytes() for name in (RUN_COMPLETE_FILE, RUN_CONFIG_FILE)}

    from preftune.trainer import PreferenceTrainer

    def refuse(self, *a, **k):
        raise PreftuneError("the optimizer refused an option")

    monkeypatch.setattr(PreferenceTrainer, "create_optimizer", refuse)
    assert main(train_args(tiny_model_dir, prefs_jsonl, out, "--max_steps", "1", "--overwrite_output_dir", "true")) == 2
    assert {name: (out / name).read_bytes() for name in finished} == finished


def test_a_run_that_fails_before_writing_removes_the_folder_it_created(prefs_jsonl, tmp_path, capsys):
    out = tmp_path / "new"
    assert main(train_args(tmp_path / "no-such-model", prefs_jsonl, out)) == 2
    assert f"the model {str(tmp_path / 'no-such-model')!r}: no such folder; check the path" in capsys.readouterr().err
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(train_args(tmp_path / "no-such-model", prefs_jsonl, kept)) == 2
    assert kept.is_dir()  # a folder the user made stays


def test_missing_eval_file_is_named(tiny_model_dir, prefs_jsonl, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, prefs_jsonl, tmp_path / "o", "--eval_split", str(tmp_path / "nope.jsonl"))) == 2
    assert f"--eval_split {str(tmp_path / 'nope.jsonl')!r}: file not found" in capsys.readouterr().err


def test_the_default_chat_template_is_saved_with_a_model_trained_on_conversations(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from preftune.data.tokenize import DEFAULT_CHAT_TEMPLATE

    messages = write_rows(tmp_path / "messages.jsonl", [
        # the demo tokenizer splits words on spaces only, so each answer starts with a word of its own
        {"prompt": [{"role": "user", "content": f"copy {i % 10}"}], "chosen": [{"role": "assistant", "content": f"{i % 10} ."}],
         "rejected": [{"role": "assistant", "content": f"{(i + 1) % 10} ."}]} for i in range(8)])
    out = tmp_path / "chat-run"
    assert main(train_args(tiny_model_dir, messages, out, "--max_steps", "1", "--max_length", "64")) == 0
    assert AutoTokenizer.from_pretrained(out).chat_template == DEFAULT_CHAT_TEMPLATE

    strings = write_rows(tmp_path / "strings.jsonl", [{"prompt": f"copy {i}", "chosen": f" {i}", "rejected": f" {i + 1}"} for i in range(8)])
    plain = tmp_path / "plain-run"
    assert main(train_args(tiny_model_dir, strings, plain, "--max_steps", "1")) == 0
    assert not AutoTokenizer.from_pretrained(plain).chat_template  # plain text: no template is invented


def test_a_run_started_with_relative_paths_is_used_from_another_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """run_config.json records local paths absolute: eval, merge and a resume work from any folder."""
    import shutil

    from preftune.rundir import ADAPTER_CONFIG_FILE

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "model")
    rows = [{"prompt": f"Q: copy {i % 10} A:", "chosen": f" {i % 10}", "rejected": f" {(i + 1) % 10}"} for i in range(16)]
    write_rows(project / "prefs.jsonl", rows)
    write_rows(project / "held.jsonl", rows[:4])
    monkeypatch.chdir(project)
    assert main(["train", "--model_name_or_path", "model", "--dataset_name", "prefs.jsonl", "--eval_split", "held.jsonl",
                 "--output_dir", "run", "--use_peft", "true", "--per_device_train_batch_size", "4", "--max_steps", "2",
                 "--save_steps", "1", "--disable_tqdm", "true", "--memory_preflight", "false"]) == 0
    run = project / "run"
    config = read_json(run / RUN_CONFIG_FILE)
    assert config["model"]["model_name_or_path"] == str(project / "model")
    assert config["data"]["dataset_name"] == [str(project / "prefs.jsonl")] and config["data"]["eval_split"] == str(project / "held.jsonl")
    assert config["command"]["argv"][:4] == ["--model_name_or_path", str(project / "model"), "--dataset_name", str(project / "prefs.jsonl")]
    assert config["dataset"] == "prefs.jsonl"  # the label stays as typed
    assert read_json(run / ADAPTER_CONFIG_FILE)["base_model_name_or_path"] == str(project / "model")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(run), "--output_dir", "eval-out"]) == 0  # the held-out file and the base model, from the record
    assert json.loads((elsewhere / "eval-out" / "eval.json").read_text())
    assert main(["merge", str(run), "--output_dir", "merged"]) == 0  # the base model named in adapter_config.json
    (run / RUN_COMPLETE_FILE).unlink()  # as if interrupted after checkpoint-2
    assert main(["train", "--output_dir", str(run), "--resume_from_checkpoint", "latest", "--max_steps", "3"]) == 0
    assert json.loads((run / "checkpoint-3" / TRAINER_STATE_FILE).read_text())["global_step"] == 3


def test_recorded_paths_are_absolute_and_hub_names_and_mixture_labels_stay(tmp_path, monkeypatch):
    from preftune.commands.train import TrainCommand
    from preftune.data.mixture import parse_dataset_entries, DatasetSpec

    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl", "tmpl.jinja"):
        (tmp_path / name).write_text("")
    (tmp_path / "mix.yaml").write_text("- path: a.jsonl\n  num_samples: 3\n- path: b.jsonl\n  label: bee\n- name: org/hub-data\n")
    record = TrainCommand(["--model_name_or_path", "org/hub-model", "--datasets", "mix.yaml", "--eval-split=test", "--output_dir", "out",
                           "--beta", "0.2", "--resume_from_checkpoint", "latest"],
                          {"chat_template_file": "tmpl.jinja", "ref_model_name_or_path": "./ref"}).as_record()
    assert record["argv"] == ["--model_name_or_path", "org/hub-model", "--eval-split=test", "--output_dir", str(tmp_path / "out"), "--beta", "0.2"]
    options = record["config_options"]
    assert options["chat_template_file"] == str(tmp_path / "tmpl.jinja") and options["ref_model_name_or_path"] == str(tmp_path / "ref")
    assert options["datasets"] == [{"path": str(tmp_path / "a.jsonl"), "num_samples": 3, "label": "a.jsonl"},
                                   {"path": str(tmp_path / "b.jsonl"), "label": "bee"}, {"name": "org/hub-data"}]
    # a source keeps its name, and so the seed of its sample, wherever the record is replayed
    before = [s.display for s in parse_dataset_entries([{"path": "a.jsonl"}, {"path": "b.jsonl", "label": "bee"}, {"name": "org/hub-data"}], DatasetSpec(""))]
    assert [s.display for s in parse_dataset_entries(options["datasets"], DatasetSpec(""))] == before


def test_a_resumed_run_ends_with_its_last_steps_metrics_and_its_time_over_all_segments(tiny_model_dir, prefs_jsonl, tmp_path, capsys):
    """The last step is logged even off the --logging_steps grid, so the final metrics are not from
    before a resume; total_train_runtime adds the time before the checkpoint resumed from."""
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, prefs_jsonl, out, "--max_steps", "2", "--save_steps", "2", "--logging_steps", "10")) == 0
    saved = json.loads((out / "checkpoint-2" / TRAINER_STATE_FILE).read_text())["stateful_callbacks"]["TrainingTimeCallback"]
    earlier = saved["attributes"]["seconds"]
    assert earlier > 0
    (out / RUN_COMPLETE_FILE).unlink()  # as if interrupted after checkpoint-2
    capsys.readouterr()
    assert main(["train", "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--max_steps", "3"]) == 0
    summary = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 3]  # step 3 is no multiple of --logging_steps 10
    final = read_json(out / RUN_COMPLETE_FILE)["final_metrics"]
    assert final["loss"] == records[-2]["loss"] and records[-2]["step"] == 3  # the last record is the run's train_runtime
    assert final["total_train_runtime"] > final["train_runtime"] and final["total_train_runtime"] > earlier
    assert "total_train_runtime" in summary


def test_training_time_adds_up_over_segments():
    """TrainingTimeCallback on a hand-driven clock: 10 s to the checkpoint, a resume trains 5 s more."""
    from types import SimpleNamespace

    from preftune.outputs import TrainingTimeCallback

    now = [100.0]
    first = TrainingTimeCallback(clock=lambda: now[0])
    state = SimpleNamespace(global_step=0, stateful_callbacks={"TrainingTimeCallback": first.state()})
    first.on_train_begin(None, state, None)
    now[0] += 10
    checkpoint = {"TrainingTimeCallback": first.state()}  # what transformers writes into trainer_state.json
    now[0] += 3  # killed 3 s after the checkpoint: those steps are trained again
    first.on_train_end(None, state, None)
    assert first.total == 13 and first.earlier == 0

    second = TrainingTimeCallback(clock=lambda: now[0])
    second.on_train_begin(None, SimpleNamespace(global_step=8, stateful_callbacks=checkpoint), None)
    now[0] += 5
    second.on_train_end(None, None, None)
    assert second.earlier == 10 and second.total == 15
    old = SimpleNamespace(global_step=8, stateful_callbacks={})  # a checkpoint from before the callback existed
    TrainingTimeCallback(clock=lambda: now[0]).on_train_begin(None, old, None)
    assert old.stateful_callbacks["TrainingTimeCallback"]["attributes"]["seconds"] == 0  # transformers' save needs the entry
