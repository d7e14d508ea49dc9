"""The one error hierarchy. A QfitError is a user's mistake (a bad flag, file or value): the CLI prints
its message as one line and exits 2, never a traceback. Standard library only; every module may import it."""

from __future__ import annotations


class QfitError(ValueError):
    """A user's mistake that qfit can explain in one line: what is wrong and what to do."""
