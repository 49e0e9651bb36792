"""What a run leaves behind: metrics.jsonl, training_curves.png, the README.md model card."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .errors import PreftuneError
from .rundir import CURVES_FILE, METRICS_FILE, MODEL_CARD_FILE

__all__ = ["MetricsFileCallback", "TrainingTimeCallback", "read_metrics", "plot_training_curves", "write_model_card", "CURVE_PANELS"]

# (title, [metric keys]) per panel; eval_ versions are drawn on the same panel when present.
CURVE_PANELS = [
    ("loss", ["loss"]),
    ("NLL (chosen)", ["nll_loss"]),
    ("reward margin", ["rewards/margins"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("log odds (chosen vs rejected)", ["log_odds_chosen"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
]


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per log event to ``output_dir/metrics.jsonl`` (main process only)."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / METRICS_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not state.global_step and self.path.exists():
            self.path.unlink()  # a fresh run (not a resume) starts a fresh file

    def on_step_end(self, args, state, control, **kwargs):
        # the last step is always logged (every process: logging gathers the loss), so the run's final
        # metrics are its last step's, not those of a logging step before it, which can even predate a resume
        if state.max_steps and state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                record[k] = v
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # full disk, file-size limit: stop in one line (a torn last line is skipped on reading)
            raise PreftuneError(f"cannot append to {str(self.path)!r} at step {state.global_step}: {e.strerror or e}; "
                                "free space, then resume with --resume_from_checkpoint latest") from e


class TrainingTimeCallback(TrainerCallback, ExportableState):
    """Seconds of training over all the segments of a run (a run interrupted and resumed is several).

    transformers' ``train_runtime`` is the time of one ``train()`` call: after a resume, only the
    resumed part. This callback is an ``ExportableState``, so every checkpoint's
    ``trainer_state.json`` carries the training seconds up to it; a run resumed from that checkpoint
    adds its own time to them (:attr:`total`, after training). Time a killed segment spent after its
    last checkpoint is not counted: those steps are trained again, and counted then.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.earlier = 0.0  # seconds of the segments before this one, up to the checkpoint it resumed from
        self.started: float | None = None
        self.total: float | None = None

    def seconds(self) -> float:
        """Training seconds of the run so far."""
        return self.earlier + (self.clock() - self.started if self.started is not None else 0.0)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds": self.seconds()}}

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name) if state.global_step else None  # resumed: the checkpoint's
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        seconds = ((saved or {}).get("attributes") or {}).get("seconds") if isinstance(saved, dict) else None
        self.earlier = float(seconds) if isinstance(seconds, (int, float)) else 0.0
        self.started, self.total = self.clock(), None
        # a checkpoint written before this callback existed has no entry; transformers' save expects one
        state.stateful_callbacks.setdefault(name, self.state())

    def on_train_end(self, args, state, control, **kwargs):
        self.total = self.seconds()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
    return out


def plot_training_curves(run_dir: str | Path, out_path: str | Path | None = None) -> Path | None:
    """Draw the curve panels from metrics.jsonl; returns the PNG path (None if nothing logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(t, ks) for t, ks in CURVE_PANELS if any(k in r or f"eval_{k}" in r for r in records for k in ks)]
    if not panels:
        return None
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                pts = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, label=(prefix + key), markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_path) if out_path else Path(run_dir) / CURVES_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _data_sources_table(sources: list[dict]) -> list[str]:
    """Per-source counts of the data (see :func:`preftune.data.splits.prepare_data`) as Markdown."""
    if not sources:
        return []
    lines = ["", "## Data", "", "| dataset | split | role | sampling | rows | bad rows | selected | train pairs | eval pairs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in sources:
        lines.append(f"| `{s['dataset']}` | {s['split']} | {s['role']} | {s['sampling']} | {s['rows']} | {s['bad_rows']} | {s['selected']} | "
                     f"{s.get('train_pairs', 0)} | {s.get('eval_pairs', 0)} |")
    return lines


def write_model_card(run_dir: str | Path, info: dict) -> Path:
    """README.md describing base model, data, method, hyper-parameters and final metrics."""
    from .methods import data_unit_of

    run_dir = Path(run_dir)
    unit = data_unit_of(info.get("method"))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [preftune, " + info.get("method", "orpo") + "]",
        "---",
        "",
        f"# {run_dir.name}",
        "",
        f"Aligned with [preftune](https://pypi.org/project/preftune/) using **{info.get('method', 'orpo').upper()}**.",
        "",
        f"- Base model: `{info.get('base_model')}`",
        f"- Data: `{info.get('dataset')}` ({info.get('train_pairs')} training {unit}, {info.get('eval_pairs', 0)} eval {unit})",
        f"- Saved: {info.get('saved', 'full model')}",
        *_data_sources_table(info.get("data_sources") or []),
        "",
        "## Hyper-parameters",
        "",
        "| name | value |",
        "| --- | --- |",
    ]
    for k, v in info.get("hyperparameters", {}).items():
        lines.append(f"| {k} | {_fmt(v)} |")
    final = info.get("final_metrics", {})
    if final:
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in final.items()]
    if (run_dir / CURVES_FILE).exists():
        lines += ["", "## Training curves", "", f"![training curves]({CURVES_FILE})"]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained('{run_dir}')", f"tokenizer = AutoTokenizer.from_pretrained('{run_dir}')", "```", ""]
    path = run_dir / MODEL_CARD_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
