"""``preftune data inspect DATA``: what a run would train on, before it runs (:mod:`preftune.data.inspect`).

Every data flag of ``preftune train`` works (they are :class:`~preftune.config.DataArguments`
fields); ``--config RUN.yaml`` takes a run file's data options and model, flags override it.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import PreftuneError
from .options import blame_file, build_parser, command_line_wins, file_options, given_flags, parse_options

__all__ = ["build_inspect_parser", "cmd_data"]

# Written out: argparse's own usage line lists all ~30 flags in declaration order, data flags first
# and DATA last, so its first line shows --max_length and none of what the command is about.
INSPECT_USAGE = ("preftune data inspect DATA [DATA ...] [--model_name_or_path M] [--json] [data options]\n"
                 "       preftune data inspect --config RUN.yaml [--model_name_or_path M] [--json] [data options]\n"
                 "data options: every data flag of preftune train, e.g. --max_length N, --max_prompt_length N,\n"
                 "  --chat_template auto|always|never, --chosen_column NAME (all listed in --help)")
USAGE = (f"usage: {INSPECT_USAGE}\n\n"
         "subcommands:\n  inspect   rows, bad rows, token lengths and truncation of preference data (see preftune data inspect --help)")
MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "trust_remote_code", "chat_template_file", "seed")


def build_inspect_parser():
    from ..config import DataArguments

    parser = build_parser(
        "preftune data inspect",
        "Read preference data exactly as `preftune train` would and report rows, bad rows, token lengths, "
        "what max_length cuts, and one pair with its prompt/completion boundary marked.",
        (DataArguments,),
    )
    parser.usage = INSPECT_USAGE
    a = parser.add_argument
    a("data", nargs="*", metavar="DATA", help="data file(s), folder(s) or hub name(s) (same as --dataset_name)")
    a("--model_name_or_path", "--model-name-or-path", default=None, metavar="M",
      help="model (folder or hub name) whose tokenizer counts tokens; without it, only rows and bad rows are reported")
    a("--tokenizer_name_or_path", "--tokenizer-name-or-path", default=None, metavar="T", help="tokenizer, if not the model's own")
    a("--trust_remote_code", "--trust-remote-code", action="store_true", help="allow tokenizer code from the model folder")
    a("--chat_template_file", "--chat-template-file", default=None, metavar="FILE", help="Jinja chat template instead of the tokenizer's")
    a("--config", default=None, metavar="RUN.yaml", help="a preftune train YAML file: its data options (and model) are used; flags override")
    a("--seed", type=int, default=None, help="sampling seed of mixtures and --eval_fraction (default: the config's, else 42)")
    a("--json", action="store_true", help="print one JSON object (for scripts)")
    return parser


def cmd_data(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "inspect":
        raise PreftuneError(f"unknown `preftune data` subcommand {argv[0]!r}; use: preftune data inspect DATA")
    from ..config import DataArguments, field_groups
    from .train import load_yaml

    parser = build_inspect_parser()
    argv = argv[1:]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    source = f"--config {known.config!r}" if known.config else None
    config = file_options(parser, load_yaml(known.config), source, set(field_groups())) if known.config else {}
    usable = set(DataArguments.__dataclass_fields__) | set(MODEL_KEYS)  # a run file's training options are ignored
    flags = given_flags(argv)
    positional = bool(parser.parse_known_args(argv)[0].data) and "dataset_name" not in flags
    if positional:  # DATA is --dataset_name
        flags.add("dataset_name")
    config, notes = command_line_wins({k: v for k, v in config.items() if k in usable}, flags, source)
    for note in notes:
        print(f"preftune: {note.replace('--dataset_name on', 'DATA on') if positional else note}", file=sys.stderr, flush=True)
    parser.set_defaults(**config)
    try:
        data_args, extra = parse_options(parser, argv, "data inspect")
        if extra.data:
            if data_args.datasets:
                raise PreftuneError("pass DATA or --datasets, not both")
            data_args.dataset_name = list(extra.data)
            data_args.__post_init__()
    except PreftuneError as e:
        raise blame_file(e, config, flags, source) from None
    tokenizer = None
    name = extra.tokenizer_name_or_path or extra.model_name_or_path
    if name:
        from ..inference_model import quiet_transformers
        from ..training_model import load_tokenizer

        with quiet_transformers():
            tokenizer = load_tokenizer(name, extra.trust_remote_code, extra.chat_template_file)
    from ..data.inspect import format_report, inspect_data

    report = inspect_data(tokenizer, data_args, extra.seed if extra.seed is not None else int(config.get("seed", 42)))
    if extra.json:
        print(json.dumps(report, ensure_ascii=False), flush=True)
    else:
        print(format_report(report, ", ".join(s.display for s in data_args.sources()), name), flush=True)
    if report["bad_row_error"] and data_args.on_bad_row == "error" and "on_bad_row" in flags | set(config):
        # asked for explicitly: fail as preftune train would, after the whole report (a check for scripts)
        raise PreftuneError(report["bad_row_error"])
    return 0
