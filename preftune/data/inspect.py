"""``preftune data inspect DATA``: what a run would train on, before it runs.

Reads the data exactly as ``preftune train`` does (same sources, cache, normalisation,
tokenization, sampling; :mod:`preftune.data.splits`), never stopping at a bad row, and reports:
rows read, row shapes, bad rows by reason and the first of them one by one (file, line, what is
wrong) with what ``--on_bad_row`` makes training do about them, token-length percentiles of prompt / chosen / rejected as training counts them (prompt
with BOS, completions with EOS, before truncation), how many pairs the current ``--max_length``
/ ``--max_prompt_length`` would truncate or drop, the ``max_length`` that keeps 99% of pairs
whole, and one pair with its prompt/completion boundary marked. The command is
:mod:`preftune.commands.data`; ``--json`` prints the dict of :func:`inspect_data`.

Percentiles are "inverted CDF" values: ``p99`` is the smallest length that at least 99% of
pairs do not exceed; a pair is whole when ``|prompt| + max(|chosen|, |rejected|) <= max_length``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..errors import PreftuneError
from .cache import BAD_ROWS_KEPT

__all__ = ["inspect_data", "format_report"]

BOUNDARY = ("\u27e6", "\u27e7")  # ⟦ completion ⟧
PERCENTILES = {"p50": 50, "p90": 90, "p99": 99}


def _percentiles(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    out = {k: int(np.percentile(values, q, method="inverted_cdf")) for k, q in PERCENTILES.items()}
    out["max"] = int(values.max())
    return out


def _example(tokenizer, source) -> dict | None:
    store = source.tokenized.store
    if tokenizer is None or not len(store):
        return None
    ids = store.pair_tokens(0).tolist()
    p, c = int(store.prompt_len[0]), int(store.chosen_len[0])
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=False)  # noqa: E731
    return {"where": source.tokenized.summary.first_example, "prompt": decode(ids[:p]), "chosen": decode(ids[p : p + c]),
            "rejected": decode(ids[p + c :])}


def inspect_data(tokenizer, data_args, seed: int = 42) -> dict:
    """The report of the module docstring as a dict.

    Keys: ``rows``, ``pairs``, ``bad_rows`` (reason -> count), ``first_bad_rows`` (the first
    ``BAD_ROWS_KEPT`` bad rows, source by source in file order: ``{"where", "reason", "detail"}``),
    ``more_bad_rows`` (how many bad rows that list leaves out), ``on_bad_row`` (the policy) and
    ``bad_row_error`` (the one-line error training stops with under ``on_bad_row: error``, or
    None when there is no bad row), ``format`` and ``formats`` (shape
    -> count), ``prompt_tokens`` / ``chosen_tokens`` / ``rejected_tokens`` (``{"p50", "p90",
    "p99", "max"}``), ``truncated`` (pairs the settings would cut), ``dropped`` (pairs they would
    drop), ``suggested_max_length``, ``suggested_max_prompt_length``, ``settings``, ``sources``,
    ``example``. Token keys are None without a tokenizer.
    """
    from .splits import bad_row_error, load_sources, pairs_of, select_examples, tokenize_settings_of, training_sources
    from .tokenize import TokenizeReport, plan_truncation

    specs = training_sources(data_args)
    if not specs:
        raise PreftuneError("no data to inspect: pass DATA (a file, folder or hub name), or a config with datasets:")
    sources = load_sources(tokenizer, specs, data_args, on_bad_row="skip")
    train, evals, counts = select_examples([s.tokenized.summary.examples for s in sources], specs, data_args, seed)
    selection = train
    if len(evals):  # --eval_fraction: the held-out part is read the same way
        from .splits import Selection

        selection = Selection(np.concatenate([train.source, evals.source]), np.concatenate([train.position, evals.position]))
    settings = tokenize_settings_of(data_args)
    pairs = pairs_of(selection, sources, settings, TokenizeReport(), untruncated=True)
    bad, shapes = Counter(), Counter()
    for s in sources:
        bad.update(s.tokenized.summary.bad)
        shapes.update(s.tokenized.summary.shapes)
    first_bad_rows = [row for s in sources for row in s.tokenized.summary.first_bad_rows][:BAD_ROWS_KEPT]
    report = {
        "rows": sum(s.tokenized.summary.rows for s in sources),
        "pairs": len(pairs),
        "bad_rows": dict(sorted(bad.items())),
        "first_bad_rows": first_bad_rows,
        "more_bad_rows": sum(bad.values()) - len(first_bad_rows),
        "on_bad_row": data_args.on_bad_row,
        "bad_row_error": next((str(bad_row_error(s, len(sources) > 1)) for s in sources if s.tokenized.summary.bad), None),
        "format": shapes.most_common(1)[0][0] if len(shapes) == 1 else "mixed" if shapes else None,
        "formats": dict(shapes),
        "settings": {"max_length": settings.max_length, "max_prompt_length": settings.max_prompt_length,
                     "truncation_mode": settings.truncation_mode, "chat_template": settings.chat_template},
        "sources": [{"dataset": s.spec.display, "split": s.spec.split, "sampling": s.spec.sampling, "rows": s.tokenized.summary.rows,
                     "examples": s.tokenized.summary.examples, "selected": counts[k], "bad_rows": s.tokenized.summary.bad,
                     "dropped_at_tokenization": s.tokenized.summary.dropped, "template_notes": s.tokenized.summary.notes,
                     "cached": s.tokenized.from_cache} for k, s in enumerate(sources)],
    }
    if tokenizer is None:
        report.update(prompt_tokens=None, chosen_tokens=None, rejected_tokens=None, truncated=None, dropped=None,
                      suggested_max_length=None, suggested_max_prompt_length=None, example=None)
        return report
    p, c, r = pairs.prompt_len.astype(np.int64), pairs.chosen_len.astype(np.int64), pairs.rejected_len.astype(np.int64)
    common = np.zeros_like(p)
    for k, s in enumerate(sources):
        sel = pairs.store_index == k
        common[sel] = s.tokenized.store.common_len[pairs.row[sel]]
    plan = plan_truncation(p, c, r, common, settings)
    kept = plan.drop == 0
    need = p + np.maximum(c, r)
    report.update(
        prompt_tokens=_percentiles(p), chosen_tokens=_percentiles(c), rejected_tokens=_percentiles(r),
        truncated=int(((plan.prompt_truncated | plan.completion_truncated) & kept).sum()),
        dropped=int((~kept).sum()),
        suggested_max_length=int(np.percentile(need, 99, method="inverted_cdf")) if len(need) else None,
        suggested_max_prompt_length=int(np.percentile(p, 99, method="inverted_cdf")) if len(p) else None,
        example=_example(tokenizer, sources[0]),
    )
    return report


def _why_no_pairs(report: dict) -> str:
    """Why a tokenized report has no pairs: its bad rows (a chat template that cannot render them
    included) and the pairs tokenization dropped, by reason."""
    causes = []
    if report["bad_rows"]:
        causes.append("bad rows: " + ", ".join(f"{n} {reason}" for reason, n in report["bad_rows"].items()))
    dropped = Counter()
    for source in report["sources"]:
        dropped.update(source["dropped_at_tokenization"])
    if dropped:
        causes.append("dropped at tokenization: " + ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())))
    return "no usable pairs" + (f" ({'; '.join(causes)})" if causes else "")


def format_report(report: dict, data_label: str, tokenizer_label: str | None) -> str:
    lines = [f"preftune data inspect: {data_label}" + (f" (tokenizer {tokenizer_label})" if tokenizer_label else "")]
    add = lambda k, v: lines.append(f"  {k:<22}{v}")  # noqa: E731
    add("rows read", report["rows"])
    add("format", ", ".join(f"{k} ({v})" for k, v in report["formats"].items()) or "-")
    add("bad rows", ", ".join(f"{v} {k}" for k, v in report["bad_rows"].items()) or "none")
    lines += [f"    {row['where']}: {row['reason']}: {row['detail']}" for row in report["first_bad_rows"]]
    if report["more_bad_rows"]:
        lines.append(f"    and {report['more_bad_rows']} more")
    if report["bad_rows"] and report["on_bad_row"] == "error":
        lines.append("    preftune train stops at the first of them (--on_bad_row error); fix them, or pass --on_bad_row skip to train without them")
    elif report["bad_rows"]:
        lines.append("    preftune train skips them (--on_bad_row skip)")
    add("usable pairs", report["pairs"])
    if report["prompt_tokens"] is None:
        if tokenizer_label is None:
            lines.append("  (pass --model_name_or_path for token lengths, truncation and an example)")
        else:  # tokenized, but nothing survived to measure
            lines.append(f"  (no token lengths: {_why_no_pairs(report)})")
        return "\n".join(lines)
    lines.append("  tokens (prompt with BOS, completions with EOS)   p50     p90     p99     max")
    for name in ("prompt", "chosen", "rejected"):
        q = report[f"{name}_tokens"] or {}
        lines.append(f"    {name:<46}" + "".join(f"{q.get(k, '-'):>8}" for k in ("p50", "p90", "p99", "max")))
    st = report["settings"]
    lines.append(f"  with max_length {st['max_length']}, max_prompt_length {st['max_prompt_length']} ({st['truncation_mode']}):")
    add("  truncated", f"{report['truncated']} pairs")
    add("  dropped", f"{report['dropped']} pairs")
    add("suggested max_length", f"{report['suggested_max_length']} (keeps 99% of pairs whole; "
        f"max_prompt_length {report['suggested_max_prompt_length']} keeps 99% of prompts)")
    ex = report.get("example")
    if ex:
        lines += ["", f"example ({ex['where']}); the completion is between {BOUNDARY[0]} and {BOUNDARY[1]}:",
                  f"{ex['prompt']}{BOUNDARY[0]}{ex['chosen']}{BOUNDARY[1]}", "", f"rejected: {BOUNDARY[0]}{ex['rejected']}{BOUNDARY[1]}"]
    return "\n".join(lines)
