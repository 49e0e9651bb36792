"""The command line: parsing, YAML configs, one-line errors, a real run on a JSONL file, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.commands.train import parse_train_args
from preftune.errors import PreftuneError

from conftest import REPO, tiny_llama

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "preftune", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the demo tokenizer, loadable by from_pretrained."""
    from preftune.demo import build_demo_tokenizer

    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_demo_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def prefs_jsonl(tmp_path):
    rows = [{"prompt": f"Q: copy {i % 10} {(i * 3) % 10} A:", "chosen": f" {i % 10} {(i * 3) % 10}", "rejected": f" {(i + 1) % 10} {(i * 3 + 1) % 10}"} for i in range(24)]
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_parses(path):
    """Every shipped config validates, and every key in it lands in the parsed options unchanged
    (a key the parser dropped or renamed would leave the run on a default)."""
    import yaml

    written = yaml.safe_load(path.read_text())
    parsed = parse_train_args(["--config", str(path)])
    assert written
    for key, value in written.items():
        holders = [group for group in parsed if hasattr(group, key)]
        assert holders, f"{path.name}: {key} is not an option"
        got = getattr(holders[0], key)
        got = getattr(got, "value", got)  # transformers' enums (lr_scheduler_type, eval_strategy, ...)
        if isinstance(got, list) and not isinstance(value, list):
            value = [value]  # list options (loss_type) take one value as a list of one
        assert got == value or str(got) == str(value), (path.name, key, value, got)
    from preftune.methods import METHODS

    assert parsed[2].method in METHODS


def test_flags_override_yaml_and_dash_case(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nbeta: 0.5\nlearning_rate: 1.0e-4\n")
    model_args, data_args, args = parse_train_args(["--config", str(cfg), "--beta", "0.25", "--max-prompt-length", "77", "--nll-on-prompt", "true"])
    assert args.beta == 0.25 and args.learning_rate == 1e-4
    assert data_args.max_prompt_length == 77 and args.nll_on_prompt is True
    assert model_args.model_name_or_path == "m"


def test_unknown_yaml_key_and_flag_suggest_fix(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\nbetaa: 0.5\n")
    with pytest.raises(PreftuneError, match=r"unknown option\(s\) 'betaa' \(did you mean 'beta'\?\)"):
        parse_train_args(["--config", str(cfg)])
    with pytest.raises(PreftuneError, match=r"unknown option '--learning_rat'.*did you mean --learning_rate"):
        parse_train_args(["--learning_rat", "1"])
    cfg.write_text("beta: [unclosed\n")
    with pytest.raises(PreftuneError, match="invalid YAML"):
        parse_train_args(["--config", str(cfg)])


def test_invalid_values_give_fix_hints():
    from preftune.methods import method_names

    assert {"orpo", "dpo", "simpo", "cpo", "sft", "kto"} <= set(method_names())
    with pytest.raises(PreftuneError, match=f"--method must be one of {', '.join(method_names())}, got 'ppo'"):
        parse_train_args(["--method", "ppo"])
    with pytest.raises(PreftuneError, match="--on_bad_row must be one of error, skip"):
        parse_train_args(["--on_bad_row", "ignore"])
    with pytest.raises(PreftuneError, match="--beta must be positive"):
        parse_train_args(["--beta", "-1"])


def test_help_groups_and_documents_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for title in ("Model", "Data", "Method and loss", "Engine and reliability", "Parameter-efficient fine-tuning", "Training (transformers"):
        assert title in out, title
    for flag in ("--on_bad_row", "--nll_on_prompt", "--batch_layout", "--per_device_train_batch_size", "--lora_r", "--config"):
        assert flag in out, flag
    # options appear under their group, not in argparse's catch-all section
    assert out.index("\n  --beta") > out.index("Method and loss:") > out.index("Data:")
    assert "(default: 800)" not in out  # help shows the real defaults, not the demo's max_steps


def test_demo_defaults_only_without_model_and_data():
    _, data_args, args = parse_train_args([])
    assert args.output_dir == "preftune-demo" and args.max_steps == 800 and data_args.max_length == 32
    _, data_args, args = parse_train_args(["--max_steps", "5"])
    assert args.max_steps == 5 and args.learning_rate == 3e-3
    _, data_args, args = parse_train_args(["--model_name_or_path", "m", "--dataset_name", "d.jsonl"])
    assert args.output_dir == "preftune-output" and data_args.max_length == 1024 and args.learning_rate == 8e-6


def test_cli_trains_on_jsonl_and_writes_outputs(tiny_model_dir, prefs_jsonl, tmp_path, capfd):
    out = tmp_path / "run"
    r = run_cli("train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(prefs_jsonl), "--output_dir", str(out),
                "--max_steps", "6", "--logging_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                "--eval_fraction", "0.25", "--eval_strategy", "steps", "--eval_steps", "3", "--disable_tqdm", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "summary" in r.stdout and "rewards/accuracies" in r.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "training_curves.png", "README.md", "run_config.json", "run_complete.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/margins" in r for r in records) and any("rewards/margins" in r for r in records)
    card = (out / "README.md").read_text()
    assert str(tiny_model_dir) in card and "prefs.jsonl" in card and "| beta | 0.1 |" in card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    # a finished run is not overwritten by accident
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(prefs_jsonl), "--output_dir", str(out), "--max_steps", "1"]) == 2
    err = capfd.readouterr().err
    assert "already holds a finished run" in err and "Traceback" not in err
    assert (out / "model.safetensors").exists()


def test_cli_trains_kto_from_yaml_on_unpaired_rows(tiny_model_dir, tmp_path, capfd, caplog):
    rows = [{"prompt": f"Q: copy {i % 10} A:", "completion": f" {(i + i % 3) % 10}", "label": i % 3 == 0} for i in range(12)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "kto.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\nmethod: kto\nloss_type: kto\nper_device_train_batch_size: 4\n"
                   f"max_steps: 2\nlogging_steps: 1\nlearning_rate: 1.0e-3\noutput_dir: {tmp_path / 'run'}\ndisable_tqdm: true\n")
    code = main(["train", "--config", str(cfg)])  # in process: a subprocess would spend ~12 s importing
    err = capfd.readouterr().err + caplog.text  # in process, pytest's log capture holds the warnings
    assert code == 0, err[-3000:]
    # 4 desirable vs 8 undesirable with weights 1/1: TRL's advice on the weights
    assert "--desirable_weight in [2.0, 2.66]" in err and "--undesirable_weight in [0.38, 0.5]" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "kl" in rec] == [1, 2]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "**KTO**" in card and "| desirable_weight | 1 |" in card and "| loss_type | kto |" in card


def test_cli_trains_with_all_fifteen_dpo_loss_types_from_yaml(tiny_model_dir, prefs_jsonl, tmp_path, capfd):
    """Every --loss_type through the YAML path in one run, weights 1: at step 1 the policy is the
    reference (every margin 0), so each term has a known value and the logged loss is their sum
    plus the sft term (the logged nll_loss)."""
    import math

    from preftune.losses import DPO_LOSS_TYPES

    assert len(DPO_LOSS_TYPES) == 15
    eps, beta, log2 = 1e-3, 0.1, math.log(2)
    at_zero_margin = {
        "sigmoid": log2, "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2, "nca_pair": 2 * log2, "robust": log2, "bco_pair": 2 * log2,
        "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - eps)) + 0.5 * (math.log(0.5) - math.log(eps)),
        "sppo_hard": 2 * (1 / (2 * beta)) ** 2, "aot": log2, "aot_unpaired": log2, "apo_zero": 1.0, "apo_down": 1.0,
        "discopop": 0.5 * log2 + 0.5 * 1.0,  # modulation sigma(0 / tau) = 1/2 between logistic log 2 and exp(0) = 1
        "sigmoid_norm": log2, "sft": 0.0,  # sft: the NLL, added from the log below
    }
    assert set(at_zero_margin) == set(DPO_LOSS_TYPES)
    cfg = tmp_path / "all.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {prefs_jsonl}\nmethod: dpo\nbeta: {beta}\nlabel_smoothing: {eps}\n"
                   f"loss_type: [{', '.join(DPO_LOSS_TYPES)}]\nper_device_train_batch_size: 4\nmax_steps: 2\nlogging_steps: 1\n"
                   f"learning_rate: 1.0e-3\noutput_dir: {tmp_path / 'run'}\ndisable_tqdm: true\n")
    assert main(["train", "--config", str(cfg)]) == 0, capfd.readouterr().err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(rec for rec in records if rec.get("step") == 1 and "loss" in rec)
    assert first["loss"] == pytest.approx(sum(at_zero_margin.values()) + first["nll_loss"], rel=1e-3)
    assert " ".join(DPO_LOSS_TYPES) in (tmp_path / "run" / "README.md").read_text()


def test_cli_bad_row_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    # in process (main() is what the console script calls): a subprocess would spend ~12 s importing
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "", "rejected": "r"}\n')
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "bad.jsonl line 2: empty field: 'chosen' is empty" in err and "--on_bad_row skip" in err


def test_cli_missing_model_and_hub_name_errors(prefs_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the second run writes into its default output folder
    assert main(["train", "--model_name_or_path", "some-org/not-a-local-model", "--dataset_name", str(prefs_jsonl), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unreachable" in err and "local folder" in err
    assert main(["train", "--model_name_or_path", str(tmp_path / "nope"), "--dataset_name", str(prefs_jsonl)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such folder" in err


def test_unknown_command():
    assert main(["trian"]) == 2


@pytest.mark.slow
def test_demo_shortened_run_learns(tmp_path, capsys):
    """The built-in demo (shortened): preference and generation accuracy both clearly improve."""
    from preftune.run import run_training

    model_args, data_args, args = parse_train_args(["--output_dir", str(tmp_path / "demo"), "--max_steps", "400", "--disable_tqdm", "true"])
    result = run_training(model_args, data_args, args)
    table = {name: (before, after) for name, before, after in result.demo_table}
    pref_before, pref_after = table["preference_accuracy"]
    gen_before, gen_after = table["generation_accuracy"]
    assert pref_after >= 0.9 and pref_after > pref_before + 0.2
    assert gen_after >= 0.5 and gen_before <= 0.05
    assert (Path(result.output_dir) / "training_curves.png").exists()


def test_warmup_ratio_and_engine_options_parse():
    _, _, args = parse_train_args(["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--warmup_ratio", "0.1",
                                   "--logprob_cache_mb", "0", "--memory_preflight", "false", "--max_tokens_per_batch", "4096"])
    assert args.warmup_steps == 0.1 and args.logprob_cache_mb == 0 and args.memory_preflight is False and args.max_tokens_per_batch == 4096
    with pytest.raises(PreftuneError, match="--warmup_ratio must be in"):
        parse_train_args(["--warmup_ratio", "1.5"])
    with pytest.raises(PreftuneError, match="--logprob_cache_mb must be >= 0"):
        parse_train_args(["--logprob_cache_mb", "-1"])


def test_shorthand_options_suggest_the_real_name_and_a_bad_value_is_not_buried_in_usage(capsys):
    with pytest.raises(PreftuneError, match="unknown option '--lr' \\(did you mean --learning_rate\\?\\)"):
        parse_train_args(["--lr", "1e-4"])
    with pytest.raises(PreftuneError, match="did you mean --num_train_epochs"):
        parse_train_args(["--epochs", "2"])
    with pytest.raises(SystemExit) as e:
        main(["train", "--max_steps", "banana"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int value: 'banana'" in err and len(err.splitlines()) <= 3, err
    assert err.startswith("usage: preftune train [options]")


# --- YAML run files: every mistake names the file, the key and the fix ------------------------------
@pytest.mark.parametrize("body,message", [
    ("per_device_train_batch_size: two", "per_device_train_batch_size: 'two' is not an integer; write e.g. per_device_train_batch_size: 8"),
    ("learning_rate: fast", "learning_rate: 'fast' is not a number; write e.g. learning_rate: 8.0e-06"),
    ("use_peft: maybe", "use_peft: 'maybe' is not true or false; write e.g. use_peft: true"),
    ("max_steps: [3]", "max_steps: expected an integer, got a list [3]"),
    ("max_steps:", "max_steps: needs a value (leave the key out for the default)"),
    ("lr_scheduler_type: cosin", "lr_scheduler_type: 'cosin' is not one of linear, cosine,"),
    ("method: dpo\nloss_weights: abc", "loss_weights: 'abc' is not a number; write e.g. loss_weights: [0.5, ...]"),
    ("dataset_name: {a: 1}", "dataset_name: expected a list, got a mapping"),
    ("datasets: [{path: a.jsonl, wieght: 2}]", "datasets entry 1 of 1: unknown key(s) 'wieght' (did you mean 'weight'?); an entry takes path, name, split,"),
    ("datasets: [{path: a.jsonl}, {path: b.jsonl, num_samples: lots}]", "datasets entry 2 of 2: num_samples must be a positive integer, got 'lots'"),
    ("datasets: {path: a.jsonl}", "datasets must be a list of dataset entries, got dict"),
    ("lora_r: 0", "--lora_r must be positive, got 0"),
    ("learning_rat: 1.0e-4", "unknown option(s) 'learning_rat' (did you mean 'learning_rate'?)"),
    ("dataset_name: [a.jsonl\nmax_steps: 3", "line 3: invalid YAML"),
    ("method: orpo\nprecompute_ref_log_probs: false", "--precompute_ref_log_probs is a reference-model option and --method orpo has no reference model"),
])
def test_yaml_mistakes_name_the_file_the_key_and_the_fix(tmp_path, body, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\n" + body + "\n")
    with pytest.raises(PreftuneError) as e:
        parse_train_args(["--config", str(cfg)])
    assert str(e.value).startswith(f"--config {str(cfg)!r}") and message in str(e.value), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_data_file_given_as_datasets_and_a_mixture_file_are_named(tmp_path, prefs_jsonl):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: m\ndatasets: {prefs_jsonl}\n")
    with pytest.raises(PreftuneError, match=r"--datasets '.*prefs.jsonl': the file holds no list of dataset entries .*for one data file: --dataset_name"):
        parse_train_args(["--config", str(cfg)])
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"- path: {prefs_jsonl}\n  wieght: 1\n")
    with pytest.raises(PreftuneError) as e:
        parse_train_args(["--model_name_or_path", "m", "--datasets", str(mix)])
    assert str(e.value).startswith(f"--datasets {str(mix)!r}: datasets entry 1 of 1: unknown key(s) 'wieght'"), str(e.value)


def test_an_error_about_a_flag_does_not_blame_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nlora_r: 4\n")
    with pytest.raises(PreftuneError) as e:
        parse_train_args(["--config", str(cfg), "--lora_r", "0"])
    assert str(e.value) == "--lora_r must be positive, got 0"


# --- the command line wins over the YAML file, alternatives included ----------------------------------
def test_a_flag_replaces_the_yaml_files_alternatives_to_it(tmp_path):
    from preftune.commands.train import train_command

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\ndatasets: [{path: a.jsonl, weight: 2}, {path: b.jsonl}]\neval_split: test\n")
    argv = ["--config", str(cfg), "--dataset_name", "c.jsonl", "--eval_fraction", "0.2"]
    _, data_args, _ = parse_train_args(argv)
    assert data_args.dataset_name == ["c.jsonl"] and data_args.datasets is None
    assert data_args.eval_fraction == 0.2 and data_args.eval_split is None
    command, notes = train_command(argv).effective()
    assert notes == [f"--dataset_name on the command line replaces datasets: of --config {str(cfg)!r}",
                     f"--eval_fraction on the command line replaces eval_split: of --config {str(cfg)!r}"]
    assert "datasets" not in command.as_record()["config_options"]  # run_config.json records what ran
    # the other way round: --datasets on the command line replaces dataset_name: of the file
    mix = tmp_path / "mix.yaml"
    mix.write_text("- path: a.jsonl\n  weight: 1\n- path: b.jsonl\n  weight: 1\n")
    cfg.write_text("model_name_or_path: m\ndataset_name: c.jsonl\n")
    _, data_args, _ = parse_train_args(["--config", str(cfg), "--datasets", str(mix)])
    assert data_args.dataset_name is None and [s.path for s in data_args.sources()] == ["a.jsonl", "b.jsonl"]
    # both on the command line, or both in the file: ambiguous, refused
    with pytest.raises(PreftuneError, match="pass either --dataset_name or datasets:"):
        parse_train_args(["--model_name_or_path", "m", "--dataset_name", "c.jsonl", "--datasets", str(mix)])
    cfg.write_text(f"model_name_or_path: m\ndataset_name: c.jsonl\ndatasets: {mix}\n")
    with pytest.raises(PreftuneError, match=r"^--config '.*run.yaml': pass either --dataset_name or datasets:"):
        parse_train_args(["--config", str(cfg)])


def test_cli_prints_the_replacement_once(tmp_path, prefs_jsonl, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'no-such-model'}\ndatasets: [{{path: elsewhere.jsonl}}]\n")
    assert main(["train", "--config", str(cfg), "--dataset_name", str(prefs_jsonl), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"preftune: --dataset_name on the command line replaces datasets: of --config {str(cfg)!r}\n" in err
    assert err.count("replaces datasets:") == 1
    assert "elsewhere.jsonl" not in err and "no-such-model" in err  # the flag's data was read, the model is what fails


# --- options that do nothing for the method are refused, when the user set them -------------------------
def test_reference_options_with_a_reference_free_method_are_refused_when_given():
    common = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl"]
    for method, flags in [("simpo", ["--precompute_ref_log_probs", "true"]), ("orpo", ["--ref_model_name_or_path", "x"]),
                          ("orpo", ["--ref_model_sync_steps", "512"]),  # explicitly given, even at its default value
                          ("cpo", ["--sync_ref_model", "false"])]:
        with pytest.raises(PreftuneError) as e:
            parse_train_args(common + ["--method", method, *flags])
        assert str(e.value) == (f"{flags[0]} is a reference-model option and --method {method} has no reference model: it applies to "
                                "--method dpo, kto only; drop it (or choose one of those methods)")
    with pytest.raises(PreftuneError, match=r"--simpo_gamma does not apply to --method dpo \(it is a setting of simpo\)"):
        parse_train_args(common + ["--method", "dpo", "--simpo_gamma", "0.5"])  # the default value, given
    _, _, args = parse_train_args(common + ["--method", "dpo", "--precompute_ref_log_probs", "true", "--ref_model_sync_steps", "64"])
    assert args.precompute_ref_log_probs and args.ref_model_sync_steps == 64
    assert parse_train_args(common + ["--method", "simpo"])[2].method == "simpo"  # defaults alone are never refused
