"""Command-line options from the config dataclasses, for every command.

Every command's flags are fields of the dataclasses in :mod:`preftune.config` (the same ones
training uses), parsed by ``transformers.HfArgumentParser`` and shown in ``--help`` under their
groups. Positional arguments (the model or run folder) are plain argparse arguments added
beside them. Flags accept ``--snake_case`` and ``--dash-case``; abbreviations are refused.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass

from ..errors import PreftuneError

__all__ = ["Positional", "build_parser", "parse_options", "given_flags", "unknown_option_error"]


@dataclass(frozen=True)
class Positional:
    name: str
    metavar: str
    help: str


def build_parser(prog: str, description: str, option_classes: tuple[type, ...], positionals: tuple[Positional, ...] = ()):
    """An ``HfArgumentParser`` over ``option_classes`` whose ``--help`` lists options by group."""
    from transformers import HfArgumentParser

    from ..config import GROUP_TITLES, field_groups

    # argparse's own usage line lists every option (about 180 lines for train) and is printed
    # before a one-line error such as "--max_steps: invalid int value"; --help lists them all
    usage = " ".join(["%(prog)s", *(p.metavar for p in positionals), "[options]   (%(prog)s --help lists them)"])
    parser = HfArgumentParser(option_classes, prog=prog, description=description, usage=usage)
    parser.allow_abbrev = False  # "--learning_rat" must be an error, not silently --learning_rate
    for p in positionals:
        parser.add_argument(p.name, metavar=p.metavar, help=p.help)
    groups = field_groups(option_classes)
    titled = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items() if key in set(groups.values())}
    # argparse has no public way to regroup actions after the fact; this only moves help entries
    for group in list(parser._action_groups):
        if group in titled.values():
            continue
        for action in list(group._group_actions):
            key = groups.get(action.dest)
            if key in titled:
                group._group_actions.remove(action)
                titled[key]._group_actions.append(action)
    return parser


def given_flags(argv: list[str]) -> set[str]:
    """Field names of the ``--flags`` present in ``argv`` (``--dash-case`` and ``--x=y`` included)."""
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


# Names users bring from other tools (TRL scripts, common shorthand) that difflib cannot match.
OPTION_ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
                  "bs": "per_device_train_batch_size", "model": "model_name_or_path", "dataset": "dataset_name",
                  "data": "dataset_name", "steps": "max_steps", "grad_accum": "gradient_accumulation_steps",
                  "lora_rank": "lora_r", "lambda": "beta", "orpo_alpha": "beta", "resume": "resume_from_checkpoint"}


def unknown_option_error(flag: str, known: set[str], command: str) -> PreftuneError:
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    alias = OPTION_ALIASES.get(name)
    close = [alias] if alias in known else difflib.get_close_matches(name, known, n=1)
    return PreftuneError(f"unknown option {flag!r}" + (f" (did you mean --{close[0]}?)" if close else "") + f"; see preftune {command} --help")


def parse_options(parser, argv: list[str], command: str):
    """Parse ``argv``: ``(dataclass instances..., positionals namespace)``; one-line errors.

    A bad value or an invalid combination (validated in each dataclass's ``__post_init__``) and an
    unknown flag become a :class:`PreftuneError`; argparse's own usage errors exit with code 2.
    """
    from ..config import field_groups

    known = set(field_groups(tuple(parser.dataclass_types)))
    try:
        *objs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except PreftuneError:
        raise
    except (ValueError, TypeError) as e:
        raise PreftuneError(str(e).strip().splitlines()[0]) from None
    if rest:
        raise unknown_option_error(rest[0], known, command)
    if objs and isinstance(objs[-1], argparse.Namespace):
        return (*objs[:-1], objs[-1])
    return (*objs, argparse.Namespace())
