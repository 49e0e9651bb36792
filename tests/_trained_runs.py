"""A short demo run shared by the after-training tests (chat, eval, report).

Trained once per test session through the real CLI (``preftune train``, the built-in demo, 60
steps) and cached here, so test_chat, test_evaluate and test_report do not each train their own.
Tests that write into a run folder copy it first (:func:`copy_run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import FP32_FLAGS

DEMO_STEPS = 60
_cache: dict[str, object] = {}


def demo_run(tmp_path_factory) -> Path:
    """Output folder of ``preftune train --max_steps 60 --bf16 false`` (the built-in demo), trained once.

    The weights training started from are recorded on the way (:func:`demo_initial_model`), so
    tests can check "base" models against what the run really started from rather than against
    a model rebuilt by the same helper the code under test uses.
    """
    if "demo" not in _cache:
        from unittest import mock

        from preftune.cli import main
        from preftune.trainer import PreferenceTrainer

        out = tmp_path_factory.mktemp("demo_run")
        train = PreferenceTrainer.train

        def recording_train(trainer, *args, **kwargs):
            _cache["initial_state"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            return train(trainer, *args, **kwargs)

        # The demo's before/after table greedily decodes 64 prompts twice, half the run's time on
        # a busy CPU; these tests never read it.
        skip_table = mock.patch("preftune.demo.evaluate_demo", return_value={"preference_accuracy": 0.0, "generation_accuracy": 0.0})
        with skip_table, mock.patch.object(PreferenceTrainer, "train", recording_train):
            # fp32: test_evaluate checks `preftune eval` (fp32) against the trainer's own final eval to 1e-4
            assert main(["train", "--output_dir", str(out), "--max_steps", str(DEMO_STEPS), "--disable_tqdm", "true", *FP32_FLAGS]) == 0
        _cache["demo"] = out
    return _cache["demo"]


def demo_initial_model(run: Path):
    """The model the demo run started training from: its saved ``config.json`` built by plain
    transformers, with the weights recorded when training began (not preftune's demo helper)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(run)))
    model.load_state_dict(_cache["initial_state"], strict=True)
    return model.eval()


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def demo_eval_rows() -> list[dict]:
    """The demo's 64 held-out rows (what its training evaluated on)."""
    from preftune.demo import demo_rows

    return demo_rows()[1]


def mark_finished(folder: Path, demo: bool = True) -> None:
    """Record ``folder`` as a finished run, as ``preftune train`` does last: ``run_complete.json`` with the
    manifest of the files in it now. Tests that build or edit a run folder by hand call this, since
    every reader verifies the folder against that manifest first."""
    from preftune.rundir import EVAL_FILE, GENERATIONS_JSONL, GENERATIONS_MD, REPORT_FILE, RUN_COMPLETE_FILE, read_sealed_json
    from preftune.saving import finish_run

    record, _ = read_sealed_json(folder / RUN_COMPLETE_FILE)
    record = {k: v for k, v in (record or {"demo": demo}).items() if k != "manifest"}
    later = {RUN_COMPLETE_FILE, EVAL_FILE, GENERATIONS_JSONL, GENERATIONS_MD, REPORT_FILE}  # written by other commands
    finish_run(folder, record, [p.name for p in folder.iterdir() if p.is_file() and p.name not in later])
