"""``preftune eval MODEL``: preference metrics on held-out pairs, optionally two models side by side.

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

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import PreftuneError
from .rundir import EVAL_FILE, GENERATIONS_JSONL, GENERATIONS_MD

__all__ = ["cmd_eval", "build_parser", "preference_metrics", "METRIC_ORDER"]

METRIC_ORDER = [
    "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
    "logps_sum/chosen", "logps_sum/rejected", "log_odds_chosen", "log_odds_ratio", "nll_loss",
]
REWARD_DEFINITION = "reference-free: reward = beta * mean per-token log-prob of the completion (ORPO/SimPO)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preftune eval",
        description="Preference metrics of a model on held-out pairs (reward accuracy, margins, log-probs, log odds, NLL), "
        "optionally beside a second model. Writes eval.json (and generations.md/.jsonl with --generate).",
    )
    a = p.add_argument
    a("model", metavar="MODEL", help="run folder of `preftune train` (full model, LoRA adapter or ReFT), save_pretrained folder, or hub name")
    a("--dataset_name", "--dataset-name", default=None, metavar="D",
      help="preference data (file, folder or hub name); default for a run folder: the pairs its training held out")
    a("--dataset_split", "--dataset-split", default="train", metavar="SPLIT", help="split of D (a single file is its own split; default train)")
    a("--dataset_format", "--dataset-format", default=None, metavar="FORMAT", help="auto or truthfulqa (default: the run's, else auto)")
    for col, what in (("prompt", "prompt"), ("chosen", "preferred answer"), ("rejected", "dispreferred answer"), ("system", "optional system prompt")):
        a(f"--{col}_column", f"--{col}-column", default=None, metavar="NAME", help=f"column with the {what} (default: the run's, else {col})")
    a("--on_bad_row", "--on-bad-row", default="error", choices=["error", "skip"], help="error (default) or skip bad rows")
    a("--max_samples", "--max-samples", type=int, default=None, metavar="N", help="evaluate only the first N pairs")
    a("--max_length", "--max-length", type=int, default=None, metavar="N", help="max prompt + completion tokens (default: the run's, else 1024)")
    a("--max_prompt_length", "--max-prompt-length", type=int, default=None, metavar="N", help="max prompt tokens (default: the run's, else 512)")
    a("--truncation_mode", "--truncation-mode", default=None, choices=["keep_end", "keep_start"], help="how to cut long prompts (default: the run's)")
    a("--chat_template", "--chat-template", default=None, choices=["auto", "always", "never"], help="when to apply the chat template (default: the run's)")
    a("--chat_template_file", "--chat-template-file", default=None, metavar="FILE", help="Jinja chat template instead of the tokenizer's")
    a("--beta", type=float, default=None, help="reward scale beta (default: the run's, else 0.1)")
    a("--batch_size", "--batch-size", type=int, default=8, metavar="N", help="pairs per forward pass (default 8)")
    a("--compare", default=None, metavar="OTHER_MODEL", help="a second model to put side by side; `base` = the model the run started from")
    a("--generate", type=int, default=0, metavar="N", help="write N prompts with each model's greedy answer to generations.md/.jsonl")
    a("--max_new_tokens", "--max-new-tokens", type=int, default=128, metavar="N", help="longest generated answer (default 128)")
    a("--output_dir", "--output-dir", default=None, metavar="DIR", help="where eval.json goes (default: MODEL's folder)")
    a("--torch_dtype", "--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    a("--trust_remote_code", "--trust-remote-code", action="store_true", help="allow model code from the model folder")
    return p


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


def _pick(flag, run_section: dict, key: str, default):
    if flag is not None:
        return flag
    value = run_section.get(key)
    return default if value is None and key not in run_section else value


def resolve_settings(args, run_config: dict | None) -> EvalSettings:
    from .data.tokenize import TokenizeSettings

    data = (run_config or {}).get("data") or {}
    training = (run_config or {}).get("training") or {}
    settings = TokenizeSettings(
        max_length=_pick(args.max_length, data, "max_length", 1024),
        max_prompt_length=_pick(args.max_prompt_length, data, "max_prompt_length", 512),
        truncation_mode=_pick(args.truncation_mode, data, "truncation_mode", "keep_end"),
        chat_template=_pick(args.chat_template, data, "chat_template", "auto"),
    )
    beta = float(_pick(args.beta, training, "beta", 0.1))
    if beta <= 0:
        raise PreftuneError(f"--beta must be positive, got {beta}")
    if args.batch_size < 1:
        raise PreftuneError(f"--batch_size must be at least 1, got {args.batch_size}")
    if settings.max_length is not None and settings.max_length < 2:
        raise PreftuneError(f"--max_length must be at least 2, got {settings.max_length}")
    return EvalSettings(settings, beta, bool(training.get("nll_on_prompt", False)), args.batch_size)


# -- data ---------------------------------------------------------------------------------------

def load_eval_examples(args, run_config: dict | None, model_name: str):
    """(examples, description) for the pairs to evaluate on."""
    from .data import ColumnMap, load_examples

    data = (run_config or {}).get("data") or {}
    if args.dataset_name is None:
        return _held_out_examples(run_config, model_name)
    columns = ColumnMap(*(getattr(args, f"{c}_column") or data.get(f"{c}_column") or c for c in ("prompt", "chosen", "rejected", "system")))
    fmt = args.dataset_format or data.get("dataset_format") or "auto"
    loaded = load_examples(args.dataset_name, args.dataset_split, columns, args.on_bad_row, fmt)
    label = args.dataset_name + (f" [{args.dataset_split}]" if args.dataset_split != "train" else "")
    if loaded.skipped:
        label += f" ({loaded.skip_summary()})"
    return loaded.examples, label


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

def preference_metrics(model, pairs, pad_id: int, beta: float, batch_size: int = 8, nll_on_prompt: bool = False) -> dict[str, float]:
    """The metrics of the module docstring for ``pairs``, through the training engine."""
    from .engine import score_pairs
    from .losses import orpo_loss

    model.eval()
    seq = score_pairs(model, pairs, pad_id, batch_size, score_prompt=nll_on_prompt)  # every field (N,)
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


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


# -- generations --------------------------------------------------------------------------------

def _text(content) -> str:
    """A string, or a message list shown as ``role: content`` lines."""
    if isinstance(content, str):
        return content
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in content)


def _prompt_text(ex) -> str:
    prompt = _text(ex.prompt)
    return f"system: {ex.system}\n\n{prompt}" if ex.system else prompt


def greedy_answers(loaded, pairs, n: int, max_new_tokens: int) -> dict[int, str]:
    """example_id -> greedy answer for the first ``n`` pairs, from the exact training prompt tokens."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tok.eos_token_id
    out = {}
    for pair in pairs[:n]:
        ids = torch.tensor([pair.prompt], device=device)
        room = max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - ids.shape[1]))
        with torch.no_grad():
            gen = loaded.generate_ids(ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, do_sample=False,
                                      eos_token_id=eos, pad_token_id=_pad_id(tok))
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


def _output_dir(args) -> Path:
    if args.output_dir:
        out = Path(args.output_dir).expanduser()
    else:
        out = Path(args.model).expanduser()
        if not out.is_dir():
            raise PreftuneError(f"{args.model!r} is not a local folder; pass --output_dir for eval.json")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreftuneError(f"cannot create --output_dir {str(out)!r}: {e.strerror or e}") from None
    return out


def _load_compare(args, chat_template_file):
    from .pretrained import load_base, load_pretrained

    if args.compare == "base" and not Path("base").exists():
        return load_base(args.model, args.torch_dtype, args.trust_remote_code, chat_template_file)
    return load_pretrained(args.compare, args.torch_dtype, args.trust_remote_code, chat_template_file)


def cmd_eval(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.generate < 0 or args.max_new_tokens < 1:
        raise PreftuneError("--generate must be >= 0 and --max_new_tokens >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise PreftuneError(f"--max_samples must be at least 1, got {args.max_samples}")
    if args.chat_template_file and not Path(args.chat_template_file).is_file():
        raise PreftuneError(f"--chat_template_file {args.chat_template_file!r} not found")
    from .pretrained import quiet_transformers

    with quiet_transformers():
        return _evaluate(args)


def _evaluate(args) -> int:
    from .data.splits import tokenize_split
    from .pretrained import check_model_arg, load_pretrained, read_run_config

    started = time.perf_counter()
    folder = check_model_arg(args.model)
    if args.compare and args.compare != "base":
        check_model_arg(args.compare)
    out_dir = _output_dir(args)
    run_config = read_run_config(folder)
    settings = resolve_settings(args, run_config)
    examples, data_label = load_eval_examples(args, run_config, args.model)
    if args.max_samples is not None:
        examples = examples[: args.max_samples]

    models = [load_pretrained(args.model, args.torch_dtype, args.trust_remote_code, args.chat_template_file)]
    if args.compare:
        models.append(_load_compare(args, args.chat_template_file))
    results, answers = [], []
    for loaded in models:
        pairs, report = tokenize_split(loaded.tokenizer, examples, settings.tokenize, loaded.label)
        metrics = preference_metrics(loaded.model, pairs, _pad_id(loaded.tokenizer), settings.beta, settings.batch_size, settings.nll_on_prompt)
        results.append({"name": loaded.label, "kind": loaded.kind, "notes": loaded.notes, "pairs": len(pairs),
                        "tokenization": report.summary(), "metrics": metrics})
        if args.generate:
            answers.append((loaded.label, greedy_answers(loaded, pairs, args.generate, args.max_new_tokens)))

    print(f"preftune eval: {len(examples)} pairs from {data_label}; beta {settings.beta:g}, "
          f"max_length {settings.tokenize.max_length}, max_prompt_length {settings.tokenize.max_prompt_length}\n")
    print(format_table(results))
    record = {
        "dataset": data_label, "examples": len(examples), "settings": settings.as_dict(), "reward_definition": REWARD_DEFINITION,
        "models": results, "seconds": round(time.perf_counter() - started, 2),
    }
    written = [out_dir / EVAL_FILE]
    if args.generate:
        rows = write_generations(out_dir, examples, answers, args.generate)
        record["generations"] = {"count": len(rows), "jsonl": GENERATIONS_JSONL, "markdown": GENERATIONS_MD}
        written += [out_dir / GENERATIONS_MD, out_dir / GENERATIONS_JSONL]
    (out_dir / EVAL_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0
