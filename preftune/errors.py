"""User-facing errors. The CLI prints these as one line (no traceback) and exits non-zero."""

from __future__ import annotations


class PreftuneError(Exception):
    """A mistake the user can fix: bad input, a missing file, an impossible setting.

    The message says what is wrong, where (file, row/line, field) and how to fix it.
    """


class EveryProcessError(PreftuneError):
    """A :class:`PreftuneError` that every process of a multi-process run raises alike, at the same
    point (they read the same files, or agreed to stop): the CLI prints it once
    (:func:`preftune.launch.say_once`), not once per process."""


class DataError(PreftuneError):
    """A bad row or unreadable data file."""

    def __init__(self, where: str, problem: str, fix: str = ""):
        self.where = where
        self.problem = problem
        self.fix = fix
        msg = f"{where}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


def describe_exception(err: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit`` characters): how a one-line error
    names a failure that came from a library (a torn safetensors header, a failed torch.save)."""
    first = (str(err).strip().splitlines() or [""])[0][:limit]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
