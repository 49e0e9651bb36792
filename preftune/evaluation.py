"""Preference metrics of a model on held-out pairs (what ``preftune eval`` computes and prints).

The pairs go through the same path as training: :func:`preftune.data.load_examples`,
:func:`preftune.data.tokenize.tokenize_examples` (with the run's own ``max_length``,
``max_prompt_length``, ``truncation_mode`` and ``chat_template`` unless flags override them),
:func:`preftune.layout.collate_pairs` and :func:`preftune.engine.sequence_logps`. The metrics are
the names training logs, with the reference-free ORPO/SimPO definitions (no reference model is
needed, so any two models compare on equal terms):

=======================  =====================================================================
``rewards/chosen``       ``beta * lc``: beta times the mean per-token log-prob of the chosen completion
``rewards/rejected``     ``beta * lr``, the same for the rejected completion
``rewards/accuracies``   fraction of pairs with ``lc > lr``
``rewards/margins``      mean of ``beta * (lc - lr)``
``logps/chosen``         mean over pairs of ``lc``
``logps/rejected``       mean over pairs of ``lr``
``logps_sum/chosen``     mean over pairs of the *summed* chosen log-prob (DPO's quantity)
``logps_sum/rejected``   the same for rejected
``log_odds_chosen``      mean ORPO log odds ratio ``log(odds(y_w) / odds(y_l))``, ``odds = p / (1 - p)``, ``p = exp(lc)``
``log_odds_ratio``       mean ``log sigma(log odds ratio)``
``nll_loss``             chosen negative log-likelihood per token (token mean over all pairs)
=======================  =====================================================================

For an ORPO run these equal the ``eval_*`` metrics the trainer logged on the same pairs.
Without ``--dataset_name``, a run folder is evaluated on the pairs its training held out
(``--eval_split`` / ``--eval_fraction``, or the built-in demo's held-out prompts).

``--compare OTHER`` evaluates a second model on the same pairs (``--compare base``: the model
the run started from). ``--generate N`` writes the first N prompts with each model's greedy
answer to ``generations.md`` and ``generations.jsonl``. Results go to ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import PreftuneError
from .hf_helpers import pad_token_id
from .rundir import GENERATIONS_JSONL, GENERATIONS_MD

__all__ = [
    "EvalSettings", "resolve_settings", "load_eval_examples", "preference_metrics", "generate_answers", "write_generations",
    "format_table", "METRIC_ORDER", "REWARD_DEFINITION",
]

METRIC_ORDER = [
    "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
    "logps_sum/chosen", "logps_sum/rejected", "log_odds_chosen", "log_odds_ratio", "nll_loss",
]
REWARD_DEFINITION = "reference-free: reward = beta * mean per-token log-prob of the completion (ORPO/SimPO)"


def with_run_defaults(options, run_section: dict, given: set[str], only: tuple[str, ...] | None = None):
    """``options`` (a config dataclass) with every field the user did not pass on the command line
    (``given``) taken from ``run_section`` of the run's ``run_config.json``, when it has it.
    ``only`` limits which fields may come from the run. Validation runs again on the result."""
    names = [f.name for f in dataclasses.fields(options) if only is None or f.name in only]
    from_run = {k: run_section[k] for k in names if k not in given and k in run_section}
    return dataclasses.replace(options, **from_run) if from_run else options


@dataclass
class EvalSettings:
    """What defines the numbers: tokenization, beta, whether prompt tokens count in the NLL."""

    tokenize: object  # TokenizeSettings
    beta: float
    nll_on_prompt: bool
    batch_size: int

    def as_dict(self) -> dict:
        t = self.tokenize
        return {"max_length": t.max_length, "max_prompt_length": t.max_prompt_length, "truncation_mode": t.truncation_mode,
                "chat_template": t.chat_template, "beta": self.beta, "nll_on_prompt": self.nll_on_prompt, "batch_size": self.batch_size}


def resolve_settings(tokenize_args, eval_args, given: set[str], run_config: dict | None) -> EvalSettings:
    """Tokenization and beta: the flags given, else the run's own values, else the defaults."""
    from .data.splits import tokenize_settings_of

    training = (run_config or {}).get("training") or {}
    tokenize_args = with_run_defaults(tokenize_args, (run_config or {}).get("data") or {}, given)
    beta = eval_args.beta if eval_args.beta is not None else float(training.get("beta", 0.1))
    return EvalSettings(tokenize_settings_of(tokenize_args), beta, bool(training.get("nll_on_prompt", False)), eval_args.batch_size)


# -- data ---------------------------------------------------------------------------------------

_FROM_RUN_WITH_NEW_DATA = ("dataset_format", "prompt_column", "chosen_column", "rejected_column", "system_column")


def load_eval_examples(source_args, given: set[str], run_config: dict | None, model_name: str):
    """(examples, description) for the pairs to evaluate on.

    With ``--dataset_name``: that data, read with the run's column names and format unless given.
    Without: the pairs the run held out (``--eval_split`` / ``--eval_fraction``, or the demo's).
    """
    from .data.splits import load_source_examples

    if not ({"dataset_name", "datasets"} & given) or not source_args.has_data:
        return _held_out_examples(run_config, model_name)
    source_args = with_run_defaults(source_args, (run_config or {}).get("data") or {}, given, only=_FROM_RUN_WITH_NEW_DATA)
    examples, loaded = load_source_examples(source_args)
    label = ", ".join(s.display for s in source_args.sources()) + (f" [{source_args.dataset_split}]" if source_args.dataset_split != "train" else "")
    if loaded.skipped:
        label += f" ({loaded.skip_summary()})"
    return examples, label


def _held_out_examples(run_config: dict | None, model_name: str):
    if run_config is None:
        raise PreftuneError(f"--dataset_name is required ({model_name!r} is not a run folder of `preftune train`, so it has no held-out pairs)")
    if run_config.get("demo"):
        from .demo import demo_examples

        _, evals, _ = demo_examples()
        return evals, "the built-in demo's held-out pairs"
    from .config import DataArguments
    from .data.splits import load_train_eval

    data = run_config.get("data") or {}
    if not (data.get("eval_split") or data.get("eval_fraction") or data.get("eval_datasets")):
        raise PreftuneError("--dataset_name is required (the run held out no pairs: it had no --eval_split, --eval_fraction or eval_datasets)")
    known = {k: v for k, v in data.items() if k in DataArguments.__dataclass_fields__}
    data_args = DataArguments(**known)
    seed = int((run_config.get("training") or {}).get("seed", 42))
    _, evals, _ = load_train_eval(data_args, seed)
    if data.get("eval_datasets"):
        return evals, f"the run's eval_datasets ({len(data['eval_datasets'])} sources)"
    how = f"split {data['eval_split']!r}" if data.get("eval_split") else f"the {data['eval_fraction']:g} held out by --eval_fraction, seed {seed}"
    return evals, f"{run_config.get('dataset') or data.get('dataset_name')} ({how})"


# -- metrics ------------------------------------------------------------------------------------

def preference_metrics(model, pairs, pad_id: int, beta: float, batch_size: int = 8, nll_on_prompt: bool = False,
                       batch_context=None) -> dict[str, float]:
    """The metrics of the module docstring for ``pairs``, through the training engine.

    ``batch_context``: the model's (see :class:`preftune.model_hooks.ModelHooks`; ReFT needs it).
    """
    from .engine import forward_scorer, score_pairs
    from .losses import orpo_loss

    model.eval()
    device = next(model.parameters()).device
    seq = score_pairs(forward_scorer(model, batch_context), pairs, pad_id, batch_size, device, score_prompt=nll_on_prompt)  # (N,) each
    nll_sum, nll_tokens = seq.nll_sum.double().sum().item(), seq.nll_count.double().sum().item()
    lc, lr = seq.chosen_avg, seq.rejected_avg  # (N,)
    pref = orpo_loss(lc, lr, beta)
    margins = pref.chosen_rewards - pref.rejected_rewards
    mean = lambda t: t.double().mean().item()  # noqa: E731
    return {
        "rewards/accuracies": mean((margins > 0).float()),
        "rewards/margins": mean(margins),
        "rewards/chosen": mean(pref.chosen_rewards),
        "rewards/rejected": mean(pref.rejected_rewards),
        "logps/chosen": mean(lc),
        "logps/rejected": mean(lr),
        "logps_sum/chosen": mean(seq.chosen_sum),
        "logps_sum/rejected": mean(seq.rejected_sum),
        "log_odds_chosen": mean(pref.log_odds),
        "log_odds_ratio": mean(pref.log_odds_ratio),
        "nll_loss": nll_sum / max(nll_tokens, 1.0),
    }


# -- generations --------------------------------------------------------------------------------

def _text(content) -> str:
    """A string, or a message list shown as ``role: content`` lines."""
    if isinstance(content, str):
        return content
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in content)


def _prompt_text(ex) -> str:
    prompt = _text(ex.prompt)
    return f"system: {ex.system}\n\n{prompt}" if ex.system else prompt


def generate_answers(loaded, pairs, n: int, generation) -> dict[int, str]:
    """example_id -> answer for the first ``n`` pairs, from the exact training prompt tokens.

    ``generation``: a :class:`preftune.config.GenerationArguments` (greedy unless it asks to sample).
    """
    import torch

    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tok.eos_token_id
    out = {}
    for pair in pairs[:n]:
        ids = torch.tensor([pair.prompt], device=device)
        room = generation.max_new_tokens if limit is None else max(1, min(generation.max_new_tokens, limit - ids.shape[1]))
        with torch.no_grad():
            gen = loaded.generate_ids(ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, **generation.generate_kwargs(),
                                      eos_token_id=eos, pad_token_id=pad_token_id(tok))
        out[pair.example_id] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return out


def write_generations(out_dir: Path, examples, answers: list[tuple[str, dict[int, str]]], n: int) -> list[dict]:
    """generations.jsonl (one row per prompt) and generations.md; returns the rows."""
    by_id = {ex.example_id: ex for ex in examples}
    ids = [i for i in answers[0][1]][:n]
    rows = []
    for i in ids:
        ex = by_id[i]
        rows.append({
            "prompt": _prompt_text(ex), "chosen": _text(ex.chosen), "rejected": _text(ex.rejected), "where": ex.where,
            "answers": [{"model": label, "answer": got.get(i, "")} for label, got in answers],
        })
    with open(out_dir / GENERATIONS_JSONL, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lines = ["# Generations", "", f"Greedy answers to {len(rows)} held-out prompts ({', '.join(f'`{label}`' for label, _ in answers)}).", ""]
    fence = "````"
    for k, row in enumerate(rows, start=1):
        lines += [f"## {k}. {row['where']}", "", "**Prompt**", "", fence, row["prompt"], fence, ""]
        for a in row["answers"]:
            lines += [f"**{a['model']}**", "", fence, a["answer"], fence, ""]
        lines += ["**Chosen (reference)**", "", fence, row["chosen"], fence, "", "**Rejected**", "", fence, row["rejected"], fence, ""]
    (out_dir / GENERATIONS_MD).write_text("\n".join(lines), encoding="utf-8")
    return rows


# -- output -------------------------------------------------------------------------------------

def _short(label: str, width: int = 24) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def format_table(results: list[dict]) -> str:
    """The terminal table: one column per model, plus the difference when there are two."""
    names = [_short(r["name"]) for r in results]
    head = ["metric"] + names + (["difference"] if len(results) == 2 else [])
    rows = []
    for key in METRIC_ORDER:
        vals = [r["metrics"].get(key) for r in results]
        cells = [key] + [f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v) for v in vals]
        if len(results) == 2 and all(isinstance(v, float) for v in vals):
            cells.append(f"{vals[0] - vals[1]:+.4f}")
        rows.append(cells)
    rows.append(["pairs"] + [str(r["pairs"]) for r in results] + ([""] if len(results) == 2 else []))
    widths = [max(len(row[c]) for row in [head] + rows) for c in range(len(head))]
    fmt = lambda row: "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


