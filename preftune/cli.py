"""``preftune`` command line: train, merge, convert, data inspect (and the after-training commands).

A user mistake (bad flag value, bad data row, missing file, unreachable hub) ends in one line
``preftune: error: ...`` and exit code 2, never a traceback. ``PREFTUNE_DEBUG=1`` shows the
traceback for bug reports.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from .errors import PreftuneError

__all__ = ["main", "build_train_parser", "parse_train_args"]

EXIT_USER_ERROR = 2


def build_train_parser():
    """HfArgumentParser over (ModelArguments, DataArguments, PreftuneConfig), options grouped for --help."""
    from transformers import HfArgumentParser

    from .config import GROUP_TITLES, DataArguments, ModelArguments, PreftuneConfig, field_groups

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, PreftuneConfig),
        prog="preftune train",
        description=(
            "Align a causal language model with preference data (ORPO by default). "
            "With no --model_name_or_path and no --dataset_name, runs the built-in demo. "
            "Every option can also be given in a YAML file (--config run.yaml); flags override the file. "
            "Options accept --snake_case and --dash-case."
        ),
    )
    parser.allow_abbrev = False  # "--learning_rat" must be an error, not silently --learning_rate
    parser.add_argument("--config", default=None, metavar="RUN.yaml", help="YAML file of options (flags on the command line override it).")
    groups = field_groups()
    new_groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for group in list(parser._action_groups):
        if group in new_groups.values():
            continue
        for action in list(group._group_actions):
            key = groups.get(action.dest)
            if key is None:
                continue
            group._group_actions.remove(action)
            new_groups[key]._group_actions.append(action)
    return parser


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise PreftuneError(f"--config {path!r}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PreftuneError(f"--config {path!r}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise PreftuneError(f"--config {path!r}: expected a mapping of option: value")
    return data


def parse_train_args(argv: list[str]):
    """Parse ``preftune train`` arguments into (ModelArguments, DataArguments, PreftuneConfig)."""
    from .config import field_groups

    parser = build_train_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    known_fields = set(field_groups())
    data = load_yaml(known.config) if known.config else {}
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    given |= {str(k).replace("-", "_") for k in data}
    if not given & {"model_name_or_path", "dataset_name", "datasets", "help"} and "-h" not in argv:
        # the built-in demo: its own settings, under the YAML file and the flags
        from .demo import DEMO_TRAINING

        parser.set_defaults(output_dir="preftune-demo", **DEMO_TRAINING)
    if known.config:
        unknown = [k for k in data if k.replace("-", "_") not in known_fields]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k.replace("-", "_"), known_fields, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise PreftuneError(f"--config {known.config!r}: unknown option(s) {', '.join(hints)}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in data.items()})
    try:
        *dataclass_objs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        model_args, data_args, train_args = dataclass_objs[:3]
    except PreftuneError:
        raise
    except (ValueError, TypeError) as e:
        raise PreftuneError(str(e).strip().splitlines()[0]) from None
    rest = [r for r in rest if r != "--config" and r != known.config]
    if rest:
        flag = rest[0]
        close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), known_fields, n=1)
        raise PreftuneError(f"unknown option {flag!r}" + (f" (did you mean --{close[0]}?)" if close else "") + "; see preftune train --help")
    return model_args, data_args, train_args


def _print_summary(result):
    rows = [(k, v) for k, v in result.final_metrics.items() if isinstance(v, (int, float))]
    keep = ("loss", "nll_loss", "rewards/margins", "rewards/accuracies", "log_odds_chosen", "eval_loss",
            "eval_rewards/accuracies", "eval_rewards/margins", "train_runtime", "tokens_per_second")
    print("\nsummary")
    for k in keep:
        for name, v in rows:
            if name == k:
                print(f"  {k:<26} {v:.4f}")
    if result.demo_table:
        print("\nbuilt-in demo, held-out prompts        before    after")
        for name, before, after in result.demo_table:
            print(f"  {name:<34} {before:7.1%}  {after:7.1%}")
    print(f"\nsaved to {result.output_dir} ({result.train_pairs} training pairs, {result.seconds:.0f} s)")


def cmd_train(argv: list[str]) -> int:
    model_args, data_args, train_args = parse_train_args(argv)
    from .run import run_training

    result = run_training(model_args, data_args, train_args)
    if train_args.process_index == 0:
        _print_summary(result)
    return 0


def cmd_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preftune convert", description="Convert a table to prompt/chosen/rejected JSON lines.")
    parser.add_argument("format", choices=["truthfulqa"], help="input table format")
    parser.add_argument("input", help="input file (csv, jsonl, json, parquet)")
    parser.add_argument("output", help="output .jsonl file")
    parser.add_argument("--max_pairs_per_question", "--max-pairs-per-question", type=int, default=None, help="keep at most N incorrect answers per question (seed 004 uses 1)")
    args = parser.parse_args(argv)
    import json

    from .data.convert import truthfulqa_to_pairs
    from .data.io import BadRecord, read_records

    out = Path(args.output)
    if out.exists() and out.resolve() == Path(args.input).resolve():
        raise PreftuneError("output would overwrite the input; choose another output file")
    records = truthfulqa_to_pairs(read_records(args.input), args.max_pairs_per_question)
    bad = [r for r in records if isinstance(r, BadRecord)]
    good = [r for r in records if not isinstance(r, BadRecord)]
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in good:
            f.write(json.dumps(r.row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"wrote {len(good)} pairs to {out}" + (f"; skipped {len(bad)} bad rows (first: {bad[0].where}: {bad[0].detail})" if bad else ""))
    return 0


# name -> (module, function, help); modules are imported only when their command runs
COMMANDS = {
    "train": ("preftune.cli", "cmd_train", "train a model on preference data (no arguments: the built-in demo)"),
    "eval": ("preftune.evaluate", "cmd_eval", "preference metrics of a model on held-out pairs"),
    "chat": ("preftune.chat", "cmd_chat", "chat with a model in the terminal"),
    "report": ("preftune.report", "cmd_report", "write a self-contained HTML report of a run"),
    "merge": ("preftune.merge", "cmd_merge", "merge a LoRA adapter into its base model"),
    "convert": ("preftune.cli", "cmd_convert", "convert a TruthfulQA-style table into preference pairs"),
    "data": ("preftune.data.inspect", "cmd_data", "inspect preference data: bad rows, token lengths, what max_length cuts"),
}


def _command(name: str):
    from importlib import import_module

    module, func, _ = COMMANDS[name]
    return getattr(import_module(module), func)


def _usage() -> str:
    lines = ["usage: preftune COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "`preftune COMMAND --help` documents each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"preftune {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"preftune: error: unknown command {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""), file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return _command(name)(rest)
    except PreftuneError as e:
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        signum = getattr(e, "signum", None)
        if signum is not None:  # RunInterrupted: a checkpoint was written
            print(f"preftune: {e}", file=sys.stderr)
            return 128 + int(signum)
        print(f"preftune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
