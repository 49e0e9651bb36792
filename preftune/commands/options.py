"""Command-line options from the config dataclasses, for every command.

Every command's flags are fields of the dataclasses in :mod:`preftune.config` (the same ones
training uses), parsed by ``transformers.HfArgumentParser`` and shown in ``--help`` under their
groups. Positional arguments (the model or run folder) are plain argparse arguments added
beside them. Flags accept ``--snake_case`` and ``--dash-case``; abbreviations are refused.

A YAML file of options (``--config RUN.yaml``) goes through the same parser as defaults under the
flags: :func:`file_options` checks its keys and values first, so that every mistake in it names
the file and the key; :func:`command_line_wins` lets a flag replace the file's alternatives to it
(``--dataset_name`` replaces ``datasets:``); :func:`blame_file` names the file in a validation
error about an option the file set.
"""

from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass, fields

from ..errors import PreftuneError

__all__ = ["Positional", "build_parser", "parse_options", "given_flags", "unknown_option_error", "file_options", "command_line_wins",
           "blame_file"]


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


def _close_key(key: str, known) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _option_actions(parser) -> dict:
    """``dest -> action`` of the parser's value-taking ``--flags`` (argparse keeps them in
    ``_actions`` only; the ``--no_flag`` twins of true-by-default booleans take no value)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.nargs != 0 and a.dest != "help"}


def _value_problem(action, value, nullable: bool) -> str | None:
    """What is wrong with ``value`` (as read from YAML) for ``action``'s option, or None.

    Checks what argparse would otherwise convert only at parse time, as a usage error that names
    no file (strings through the option's type, choices), and values of the wrong kind that
    would reach the dataclass unchecked (a list or a word for a number). Options of other types
    (paths, names, dicts for --deepspeed) take the value as it is."""
    from transformers.hf_argparser import string_to_bool

    if value is None:
        return None if nullable else "needs a value (leave the key out for the default)"
    kinds = {int: "an integer", float: "a number", string_to_bool: "true or false"}
    kind = kinds.get(action.type)
    listed = action.nargs in ("+", "*")
    if not (kind or action.choices or listed):
        return None
    if isinstance(value, dict) or (isinstance(value, list) and not listed):
        shape = "a mapping" if isinstance(value, dict) else "a list"
        wanted = ("a list" + (f" ({kind} each)" if kind else "")) if listed else (kind or "one value")
        return f"expected {wanted}, got {shape} {value!r}"
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and (kind or action.choices):
            try:
                item = action.type(item)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                return f"{item!r} is not {kind}"
        elif kind == "an integer" and (isinstance(item, bool) or not isinstance(item, int)):
            return f"{item!r} is not {kind}"
        elif kind == "a number" and (isinstance(item, bool) or not isinstance(item, (int, float))):
            return f"{item!r} is not {kind}"
        elif kind == "true or false" and not (isinstance(item, bool) or item in (0, 1)):
            return f"{item!r} is not {kind}"
        if action.choices and item not in action.choices:
            return f"{item!r} is not one of {', '.join(map(str, action.choices))}"
    return None


def file_options(parser, options: dict, source: str, known: set[str] | None = None) -> dict:
    """A YAML file's ``options`` (keys in ``--dash-case`` or snake_case) as ``{field: value}``,
    checked against ``parser``: a key that is no option of ``known`` (default: the parser's) and a
    value that the option cannot take stop with one line naming ``source``, the key and the fix.
    Keys outside the parser (but in ``known``) are returned unchecked."""
    actions = _option_actions(parser)
    known = set(actions) if known is None else known
    out = {str(k).replace("-", "_"): v for k, v in options.items()}
    unknown = [k for k in out if k not in known]
    if unknown:
        hints = ", ".join(f"{k!r}{_close_key(k, known)}" for k in unknown)
        raise PreftuneError(f"{source}: unknown option(s) {hints}; remove or rename them (every option: preftune train --help)")
    nullable = {f.name for cls in getattr(parser, "dataclass_types", ()) for f in fields(cls)
                if "None" in str(f.type) or "Optional" in str(f.type) or f.default is None}
    for key, value in out.items():
        if key not in actions:
            continue
        problem = _value_problem(actions[key], value, key in nullable or actions[key].default is None)
        if problem:
            raise PreftuneError(f"{source}: {key}: {problem}; write e.g. {key}: {_example(actions[key])}")
    return out


def _example(action) -> str:
    """A value ``action``'s option takes, as YAML: its default when that is one, else a typical value."""
    from transformers.hf_argparser import string_to_bool

    if action.choices:
        one = str(next(iter(action.choices)))
    elif action.type is string_to_bool:
        one = "true"
    elif action.type in (int, float) and isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
        one = f"{action.default:g}" if action.type is float else str(action.default)
        one = one if action.type is int or "." in one or "e" not in one else one.replace("e", ".0e", 1)  # YAML reads 1e-05 as text
    else:
        one = {int: "8", float: "0.5"}.get(action.type, "NAME")
    return f"[{one}, ...]" if action.nargs in ("+", "*") else one


def command_line_wins(options: dict, flags: set[str], source: str) -> tuple[dict, list[str]]:
    """The file's ``options`` without the ones a flag replaces, and one line per replacement.

    Flags override the file; for options that exclude each other
    (:data:`preftune.config.ALTERNATIVE_OPTIONS`: ``dataset_name`` / ``datasets``, the eval
    split), a flag also replaces the file's alternatives to it, so ``--dataset_name X`` with a
    file that has ``datasets:`` trains on X."""
    from ..config import ALTERNATIVE_OPTIONS

    out, notes = dict(options), []
    for group in ALTERNATIVE_OPTIONS:
        on_command_line = [name for name in group if name in flags]
        replaced = [name for name in group if name in out and name not in flags]
        if on_command_line and replaced:
            for name in replaced:
                del out[name]
            notes.append(f"{' and '.join('--' + n for n in on_command_line)} on the command line replace{'s' if len(on_command_line) == 1 else ''} "
                         f"{', '.join(n + ':' for n in replaced)} of {source}")
    return out, notes


def blame_file(error: PreftuneError, file_keys, flags: set[str], source: str | None) -> PreftuneError:
    """``error`` with ``source`` in front when it is about an option the file set (named as
    ``--option`` or leading the message, e.g. ``datasets entry 2: ...``) and no flag overrode."""
    message = str(error)
    named = set(re.findall(r"--([A-Za-z0-9_]+)", message))
    lead = re.match(r"([a-z0-9_]+)\b", message)
    if lead:
        named.add(lead.group(1))
    if source is None or message.startswith(source) or not (named & (set(file_keys) - flags)):
        return error
    return PreftuneError(f"{source}: {message}")


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
