"""Errors a user can fix. The CLI turns each into a one-line message and exit code 2."""
from __future__ import annotations


class RaysparseError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(RaysparseError, ValueError):
    """A setting is out of range or inconsistent with another one."""


class DataError(RaysparseError):
    """A dataset or data file cannot be found or loaded."""


class ModelError(RaysparseError):
    """A model cannot be found, loaded, or is of an unsupported family."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C). Not a RaysparseError: the CLI exits 130, not 2.

    `resume` is the command that continues the run (None when nothing can be resumed);
    `report` what the run had finished, when it got that far.
    """

    def __init__(self, resume: str | None, report: dict | None = None) -> None:
        super().__init__("interrupted")
        self.resume = resume
        self.report = report


def parse_error_line(exc: Exception) -> str:
    """One line for a YAML / JSON / decoding error: YAML's own message spans several lines
    with a caret drawing, which the one-line error rule cannot carry."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
