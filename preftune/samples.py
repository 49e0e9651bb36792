"""``--eval_generate N``: greedy answers to N fixed held-out prompts while the model trains.

Before the first step (step 0, the starting model), after every evaluation and at the end of
training, the model answers the first ``N`` held-out pairs' prompts greedily, from the prompt
tokens exactly as training tokenized them (so the same prompts every time), up to
``--eval_generate_max_new_tokens`` tokens or EOS. Each point appends one JSON line to
``samples.jsonl``::

    {"step": 40, "epoch": 1.0, "samples": [{"example_id": 7, "prompt": "...", "answer": "..."}, ...]}

and the answers are logged. ``preftune report`` shows, per prompt, the answer at each step next
to the training curves. A fresh run starts a fresh file; a resumed run appends (the report keeps
the last line of a step written twice).

Every process generates (sharded models need all of them in each forward); the main one writes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from .rundir import SAMPLES_FILE

__all__ = ["SampleAnswersCallback", "read_samples"]

logger = logging.getLogger("preftune")


class SampleAnswersCallback(TrainerCallback):
    """Writes greedy answers to fixed prompts at step 0, each evaluation and the end (module docstring)."""

    def __init__(self, output_dir: str | Path, tokenizer, pairs, max_new_tokens: int, hooks=None):
        from .model_hooks import NO_HOOKS

        self.path = Path(output_dir) / SAMPLES_FILE
        self.hooks = hooks or NO_HOOKS  # a ReFT model generates through its hooks (plain generate is the base model)
        self.tokenizer = tokenizer
        self.pairs = list(pairs)
        self.max_new_tokens = max_new_tokens
        self.prompts = [tokenizer.decode(p.prompt, skip_special_tokens=True) for p in self.pairs]
        self._written: set[int] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            if state.is_world_process_zero and self.path.exists():
                self.path.unlink()  # a fresh run (not a resume) starts a fresh file
            self._record(state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def _answers(self, model) -> dict[int, str]:
        from .config import GenerationArguments
        from .evaluation import generate_answers
        from .inference_model import LoadedModel
        from .linear_kernel import release_cast_copies

        # generation runs outside autocast: frozen weights held in bf16 for the training steps get
        # their float32 tensors back first (else every layer would upcast its weight at every token)
        release_cast_copies(model)
        was_training = model.training
        model.eval()
        try:
            loaded = LoadedModel(model, self.tokenizer, "training", "model in training", None, hooks=self.hooks)
            return generate_answers(loaded, self.pairs, len(self.pairs), GenerationArguments(max_new_tokens=self.max_new_tokens))
        finally:
            model.train(was_training)

    def _record(self, state, model) -> None:
        if model is None or state.global_step in self._written:
            return
        self._written.add(state.global_step)
        answers = self._answers(model)
        if not state.is_world_process_zero:
            return
        samples = [{"example_id": p.example_id, "prompt": prompt, "answer": answers[p.example_id]} for p, prompt in zip(self.pairs, self.prompts)]
        record = {"step": state.global_step, "epoch": state.epoch or 0.0, "samples": samples}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        shown = "\n".join(f"  {s['prompt'][-60:]!r} -> {s['answer'][:120]!r}" for s in samples)
        logger.info("sample answers at step %d:\n%s", state.global_step, shown)


def read_samples(run_dir: str | Path) -> list[dict]:
    """The records of ``samples.jsonl`` in step order, one per step (the last one written wins)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line after a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("samples"), list):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]
