"""User-facing errors. The CLI prints these as one line (no traceback) and exits non-zero."""

from __future__ import annotations


class PreftuneError(Exception):
    """A mistake the user can fix: bad input, a missing file, an impossible setting.

    The message says what is wrong, where (file, row/line, field) and how to fix it.
    """


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
