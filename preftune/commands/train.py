"""``preftune train``: options from the command line and a YAML file, then :func:`preftune.run.run_training`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import PreftuneError
from .options import blame_file, build_parser, command_line_wins, file_options, given_flags, unknown_option_error

__all__ = ["build_train_parser", "parse_train_args", "parse_train_command", "train_command", "TrainCommand", "cmd_train"]


def build_train_parser():
    """HfArgumentParser over (ModelArguments, DataArguments, PreftuneConfig), options grouped for --help."""
    from ..config import TRAIN_OPTIONS

    parser = build_parser(
        "preftune train",
        "Align a causal language model with preference data (ORPO by default). "
        "With no --model_name_or_path and no --dataset_name, runs the built-in demo. "
        "Every option can also be given in a YAML file (--config run.yaml); flags override the file. "
        "Options accept --snake_case and --dash-case.",
        TRAIN_OPTIONS,
    )
    parser.add_argument("--config", default=None, metavar="RUN.yaml", help="YAML file of options (flags on the command line override it).")
    return parser


def load_yaml(path: str) -> dict:
    """A YAML run file as a mapping of option: value; one-line errors."""
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


INPUT_FLAGS = frozenset({"model_name_or_path", "dataset_name", "datasets"})  # what makes a run not the demo


@dataclass(frozen=True)
class TrainCommand:
    """What ``preftune train`` was given: the command-line flags (without ``--config``) and the YAML
    file's options. run_config.json records it, so a run can be resumed from its folder alone."""

    argv: list[str]
    file_options: dict
    options_source: str | None = None  # where file_options came from, for messages: the YAML file or the run folder

    def effective(self) -> tuple[TrainCommand, list[str]]:
        """This command with the file's options that a flag replaces left out
        (:func:`preftune.commands.options.command_line_wins`), and one line per replacement."""
        options, notes = command_line_wins({str(k).replace("-", "_"): v for k, v in self.file_options.items()}, given_flags(self.argv),
                                           self.options_source or "the options file")
        return TrainCommand(self.argv, options, self.options_source), notes

    def as_record(self) -> dict:
        """The run's options, not how this process was started: without ``--resume_from_checkpoint``
        and ``--allow_world_size_change`` (a decision for one resume, not for the next one), and with
        every local path absolute (:func:`preftune.config.with_absolute_paths`), so the command replays
        from any working directory. A mixture given on the command line (``--datasets FILE``) is
        recorded as the list of entries it held, under ``config_options``."""
        from ..config import with_absolute_paths

        argv, mixtures = _absolute_path_flags(_without_flags(self.argv, RESUME_FLAGS + ALLOW_WORLD_SIZE_FLAGS))
        options = {k: v for k, v in self.file_options.items() if k.replace("-", "_") not in ("resume_from_checkpoint", "allow_world_size_change")}
        return {"argv": argv, "config_options": with_absolute_paths({**options, **mixtures})}


RESUME_FLAGS = ("--resume_from_checkpoint", "--resume-from-checkpoint")
ALLOW_WORLD_SIZE_FLAGS = ("--allow_world_size_change", "--allow-world-size-change")


def _without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without ``flags`` and their values (``--flag value``, ``--flag=value``, or ``--flag``
    alone before the next option, as a yes/no option may be given)."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            skip = False
            continue
        skip = a in flags
        if not skip and not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


def _absolute_path_flags(argv: list[str]) -> tuple[list[str], dict]:
    """``argv`` with the values of its path flags absolute (:func:`preftune.config.with_absolute_paths`),
    and without its mixture flags (``--datasets``, ``--eval_datasets``), returned apart as options."""
    from ..config import MIXTURE_OPTIONS, NAME_OR_PATH_OPTIONS, PATH_OPTIONS, with_absolute_paths

    out, mixtures, flag, taken = [], {}, None, 0
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            flag, taken = name.replace("-", "_"), 0
            if flag in MIXTURE_OPTIONS:
                if eq:
                    mixtures[flag], flag = value, None
                continue
            if eq:
                a = f"--{name}=" + with_absolute_paths({flag: value})[flag]
                flag = None
        elif flag in MIXTURE_OPTIONS:
            mixtures[flag], flag = a, None
            continue
        elif flag in (*PATH_OPTIONS, *NAME_OR_PATH_OPTIONS) and (taken == 0 or flag == "dataset_name"):  # --dataset_name A B ...
            a, taken = with_absolute_paths({flag: a})[flag], taken + 1
        out.append(a)
    return out, mixtures


def train_command(argv: list[str]) -> TrainCommand:
    """``argv`` and its ``--config`` file as one command; when it resumes a run (``--resume_from_checkpoint``
    with no model or data named) whose folder recorded its command, that command comes first and
    ``argv`` overrides it: ``preftune train --output_dir RUN --resume_from_checkpoint latest`` continues
    RUN with the options it was started with."""
    from ..rundir import RUN_CONFIG_FILE, read_json

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--output_dir", "--output-dir", default=None)
    pre.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None)
    known, _ = pre.parse_known_args(argv)
    options = load_yaml(known.config) if known.config else {}
    command = TrainCommand(_without_flags(argv, ("--config",)), options, f"--config {known.config!r}" if known.config else None)
    given = given_flags(argv) | {str(k).replace("-", "_") for k in options}
    resume = known.resume_from_checkpoint or options.get("resume_from_checkpoint")
    if not resume or given & INPUT_FLAGS:
        return command
    folder = known.output_dir or options.get("output_dir") or options.get("output-dir")
    if folder is None and str(resume) not in ("latest", "true", "True"):
        folder = str(Path(str(resume)).expanduser().parent)  # an explicit checkpoint folder: its run's folder
    if folder is None:
        return command
    record = read_json(Path(folder).expanduser() / RUN_CONFIG_FILE)
    if not record or record.get("demo"):
        return command  # no run there yet (resolving the checkpoint will say so), or the demo's own run
    recorded = record.get("command")
    if not recorded:
        raise PreftuneError(
            f"{folder!r} holds a run of {record.get('base_model')!r} on {record.get('dataset')!r} that did not record its options "
            "(started before preftune recorded them); resume it with the options it was started with, plus --resume_from_checkpoint latest"
        )
    return TrainCommand(list(recorded.get("argv", [])) + command.argv, {**recorded.get("config_options", {}), **options},
                        command.options_source or f"{str(Path(folder) / RUN_CONFIG_FILE)!r}")


def parse_train_args(argv: list[str]):
    """Parse ``preftune train`` arguments into (ModelArguments, DataArguments, PreftuneConfig)
    (a resumed run's recorded options under them: :func:`train_command`)."""
    return parse_train_command(train_command(argv))


def parse_train_command(command: TrainCommand):
    """:func:`parse_train_args` of a :class:`TrainCommand` (its :meth:`~TrainCommand.effective` options)."""
    from ..config import field_groups

    command, _ = command.effective()
    parser = build_train_parser()
    argv, source = command.argv, command.options_source
    known_fields = set(field_groups())
    flags = given_flags(argv)
    data = file_options(parser, command.file_options, source, known_fields) if command.file_options else {}
    given = flags | set(data)
    if not given & (INPUT_FLAGS | {"help"}) and "-h" not in argv:
        # the built-in demo: its own settings, under the YAML file and the flags
        from ..demo import DEMO_TRAINING

        parser.set_defaults(output_dir="preftune-demo", **DEMO_TRAINING)
    parser.set_defaults(**data)
    try:
        *dataclass_objs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        model_args, data_args, train_args = dataclass_objs[:3]
        train_args.check_options_apply(given & known_fields)  # options set explicitly, even to their defaults
    except PreftuneError as e:
        raise blame_file(e, data, flags, source) from None
    except (ValueError, TypeError) as e:
        raise blame_file(PreftuneError(str(e).strip().splitlines()[0]), data, flags, source) from None
    if rest:
        raise unknown_option_error(rest[0], known_fields, "train")
    return model_args, data_args, train_args


def _print_summary(result, method: str):
    rows = [(k, v) for k, v in result.final_metrics.items() if isinstance(v, (int, float))]
    keep = ("loss", "nll_loss", "rewards/margins", "rewards/accuracies", "log_odds_chosen", "eval_loss",
            "eval_rewards/accuracies", "eval_rewards/margins", "train_runtime", "total_train_runtime", "tokens_per_second")
    if not any(name == "loss" for name, _ in rows):  # no logging step came (--max_steps < --logging_steps)
        keep = ("train_loss", *keep)
    print("\nsummary")
    for k in keep:
        for name, v in rows:
            if name == k:
                print(f"  {k:<26} {v:.4f}")
    if result.demo_table:
        print("\nbuilt-in demo, held-out prompts        before    after")
        for name, before, after in result.demo_table:
            print(f"  {name:<34} {before:7.1%}  {after:7.1%}")
    from ..methods import data_unit_of

    print(f"\nsaved to {result.output_dir} ({result.train_pairs} training {data_unit_of(method)}, {result.seconds:.0f} s)")


def cmd_train(argv: list[str]) -> int:
    command, notes = train_command(argv).effective()
    model_args, data_args, train_args = parse_train_command(command)
    if train_args.process_index == 0:
        for note in notes:
            print(f"preftune: {note}", file=sys.stderr, flush=True)
    from ..launch import end_processes
    from ..run import run_training

    result = run_training(model_args, data_args, train_args, command=command.as_record())
    if train_args.process_index == 0:
        _print_summary(result, train_args.method)
    end_processes()  # before exit: a process group left to the interpreter's teardown can abort it (preftune.launch)
    return 0
