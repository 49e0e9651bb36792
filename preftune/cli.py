"""``preftune`` command line: dispatch to one module per command (:mod:`preftune.commands`).

A user mistake (bad flag value, bad data row, missing file, unreachable hub) ends in one line
``preftune: error: ...`` and exit code 2, never a traceback. ``PREFTUNE_DEBUG=1`` shows the
traceback for bug reports.
"""

from __future__ import annotations

import difflib
import os
import sys

from .errors import EveryProcessError, PreftuneError

__all__ = ["main", "COMMANDS"]

EXIT_USER_ERROR = 2


# name -> (module, function, help); modules are imported only when their command runs
COMMANDS = {
    "train": ("preftune.commands.train", "cmd_train", "train a model on preference data (no arguments: the built-in demo)"),
    "eval": ("preftune.commands.eval", "cmd_eval", "preference metrics of a model on held-out pairs"),
    "chat": ("preftune.commands.chat", "cmd_chat", "chat with a model in the terminal"),
    "report": ("preftune.commands.report", "cmd_report", "write a self-contained HTML report of a run"),
    "merge": ("preftune.commands.merge", "cmd_merge", "merge a LoRA adapter into its base model"),
    "export": ("preftune.commands.export", "cmd_export", "write a model as a GGUF file for llama.cpp / Ollama / LM Studio"),
    "verify": ("preftune.commands.verify", "cmd_verify", "check a run folder and its checkpoints for damaged or missing files"),
    "convert": ("preftune.commands.convert", "cmd_convert", "convert a TruthfulQA-style table into preference pairs"),
    "data": ("preftune.commands.data", "cmd_data", "inspect preference data: bad rows, token lengths, what max_length cuts"),
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


PRELOAD_COMMANDS = ("train", "eval")  # the commands whose memory a better allocator cuts (preftune.allocator)


def _restart_on_better_allocator() -> None:
    from .allocator import reexec_with_allocator

    try:
        reexec_with_allocator()  # returns only when it does not restart
    except ValueError as e:
        raise PreftuneError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
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
        if from_command_line and name in PRELOAD_COMMANDS:
            _restart_on_better_allocator()
        return _command(name)(rest)
    except PreftuneError as e:
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        signum = getattr(e, "signum", None)
        text = f"preftune: {e}" if signum is not None else f"preftune: error: {e}"  # RunInterrupted: a checkpoint was written
        if isinstance(e, EveryProcessError):  # every process of a torchrun launch has it: printed once
            from .launch import say_once

            say_once(text)
        else:
            print(text, file=sys.stderr)
        return 128 + int(signum) if signum is not None else EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
