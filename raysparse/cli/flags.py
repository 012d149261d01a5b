"""Flags derived from a settings dataclass: each declared field becomes one option in its --help group.

Defaults are written into the help text once, by us, and never put on the parser
(argparse.SUPPRESS): a flag not given leaves no value in the namespace, so it cannot override
a `--config` file, and --help never prints "(default: None)".
"""
from __future__ import annotations

import argparse
from typing import Any

from raysparse.config import Setting, settings_of


def add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for every field of `cls` that has one (groups in order of first appearance)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in settings_of(cls).values():
        if not spec.cli:
            continue
        target: argparse._ActionsContainer = parser
        if spec.group is not None:
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            target = groups[spec.group]
        target.add_argument(spec.flag, *spec.flags, dest=spec.name, default=argparse.SUPPRESS,
                            help=help_line(spec), **_kind(spec))


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of `cls` given on the command line (flags not given are absent, not None)."""
    given = vars(args)
    return {name: given[name] for name in settings_of(cls) if name in given}


def help_line(spec: Setting) -> str:
    """The declared help with the default once, e.g. 'calibration windows (default 128)'."""
    if spec.shown is not None:
        shown = spec.shown
    elif spec.base is bool:
        shown = "on" if spec.default else "off"
    elif spec.default is None:
        shown = None
    else:
        shown = str(spec.default)
    text = spec.help + (f" (default {shown})" if shown else "")
    return text.replace("%", "%%")  # argparse %-formats help strings


def _kind(spec: Setting) -> dict[str, Any]:
    if spec.base is bool:
        return {"action": argparse.BooleanOptionalAction}  # --save and --no-save, --no-keep-best and --keep-best
    kind: dict[str, Any] = {} if spec.base is str else {"type": spec.base}
    if spec.choices:
        kind["choices"] = spec.choices
    return kind
