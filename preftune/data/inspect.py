"""``preftune data inspect DATA``: what a run would train on, before it runs.

Reads the data exactly as ``preftune train`` does (same sources, cache, normalisation,
tokenization, sampling; :mod:`preftune.data.splits`), never stopping at a bad row, and reports:
rows read, row shapes, bad rows by reason, token-length percentiles of prompt / chosen /
rejected as training counts them (prompt with BOS, completions with EOS, before truncation),
how many pairs the current ``--max_length`` / ``--max_prompt_length`` would truncate or drop,
the ``max_length`` that keeps 99% of pairs whole, and one pair with its prompt/completion
boundary marked. ``--json`` prints one object instead (keys in :func:`inspect_data`).

Percentiles are "inverted CDF" values: ``p99`` is the smallest length that at least 99% of
pairs do not exceed; a pair is whole when ``|prompt| + max(|chosen|, |rejected|) <= max_length``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from ..errors import PreftuneError

__all__ = ["cmd_data", "inspect_data", "build_inspect_parser"]

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

    Keys: ``rows``, ``pairs``, ``bad_rows`` (reason -> count), ``format`` and ``formats`` (shape
    -> count), ``prompt_tokens`` / ``chosen_tokens`` / ``rejected_tokens`` (``{"p50", "p90",
    "p99", "max"}``), ``truncated`` (pairs the settings would cut), ``dropped`` (pairs they would
    drop), ``suggested_max_length``, ``suggested_max_prompt_length``, ``settings``, ``sources``,
    ``example``. Token keys are None without a tokenizer.
    """
    from .splits import load_sources, pairs_of, select_examples, tokenize_settings_of, training_sources
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
    report = {
        "rows": sum(s.tokenized.summary.rows for s in sources),
        "pairs": len(pairs),
        "bad_rows": dict(sorted(bad.items())),
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


def format_report(report: dict, data_label: str, tokenizer_label: str | None) -> str:
    lines = [f"preftune data inspect: {data_label}" + (f" (tokenizer {tokenizer_label})" if tokenizer_label else "")]
    add = lambda k, v: lines.append(f"  {k:<22}{v}")  # noqa: E731
    add("rows read", report["rows"])
    add("format", ", ".join(f"{k} ({v})" for k, v in report["formats"].items()) or "-")
    add("bad rows", ", ".join(f"{v} {k}" for k, v in report["bad_rows"].items()) or "none")
    add("usable pairs", report["pairs"])
    if report["prompt_tokens"] is None:
        lines.append("  (pass --model_name_or_path for token lengths, truncation and an example)")
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


def build_inspect_parser():
    """``preftune data inspect``: every data flag of ``preftune train`` (from DataArguments) plus its own."""
    from transformers import HfArgumentParser

    from ..config import DataArguments

    parser = HfArgumentParser((DataArguments,), prog="preftune data inspect",
                              description="Read preference data exactly as `preftune train` would and report rows, bad rows, "
                                          "token lengths, what max_length cuts, and one pair with its prompt/completion boundary.")
    parser.allow_abbrev = False
    parser.add_argument("data", nargs="*", metavar="DATA", help="data file(s), folder(s) or hub name(s) (same as --dataset_name)")
    parser.add_argument("--model_name_or_path", "--model-name-or-path", default=None, metavar="M",
                        help="model (folder or hub name) whose tokenizer counts tokens; without it, only rows and bad rows are reported")
    parser.add_argument("--tokenizer_name_or_path", "--tokenizer-name-or-path", default=None, metavar="T", help="tokenizer, if not the model's own")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help="allow tokenizer code from the model folder")
    parser.add_argument("--config", default=None, metavar="RUN.yaml", help="a preftune train YAML file: its data options (and model) are used; flags override")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed of mixtures and --eval_fraction (default: the config's, else 42)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    return parser


def cmd_data(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: preftune data inspect DATA [--model_name_or_path M] [data flags] [--json]\n\n"
              "subcommands:\n  inspect   rows, bad rows, token lengths and truncation of preference data (see --help)")
        return 0 if argv else 2
    if argv[0] != "inspect":
        raise PreftuneError(f"unknown `preftune data` subcommand {argv[0]!r}; use: preftune data inspect DATA")
    from ..config import DataArguments

    parser = build_inspect_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv[1:])
    from ..cli import load_yaml

    config = load_yaml(known.config) if known.config else {}
    fields = set(DataArguments.__dataclass_fields__)
    own = {"model_name_or_path", "tokenizer_name_or_path", "trust_remote_code", "seed"}
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in fields | own})
    try:
        data_args, extra, rest = parser.parse_args_into_dataclasses(args=argv[1:], return_remaining_strings=True)
    except PreftuneError:
        raise
    except (ValueError, TypeError) as e:
        raise PreftuneError(str(e).strip().splitlines()[0]) from None
    if rest:
        raise PreftuneError(f"unknown option {rest[0]!r}; see preftune data inspect --help")
    if extra.data:
        if data_args.datasets:
            raise PreftuneError("pass DATA or a config with datasets:, not both")
        data_args.dataset_name = list(extra.data)
        data_args.__post_init__()
    tokenizer, tok_label = None, None
    name = extra.tokenizer_name_or_path or extra.model_name_or_path
    if name:
        from ..modeling import load_tokenizer
        from ..pretrained import quiet_transformers

        with quiet_transformers():
            tokenizer = load_tokenizer(name, extra.trust_remote_code, data_args.chat_template_file)
        tok_label = name
    seed = extra.seed if extra.seed is not None else int(config.get("seed", 42))
    report = inspect_data(tokenizer, data_args, seed)
    if extra.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        from .splits import training_sources

        label = ", ".join(s.display for s in training_sources(data_args))
        print(format_report(report, label, tok_label))
    sys.stdout.flush()
    return 0
