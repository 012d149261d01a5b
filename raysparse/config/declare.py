"""One declaration per setting: type, default, help and simple constraints live on the dataclass field.

A setting used to be written three times (the field, an argparse flag, a validation line) and
the copies drifted. Now `setting(...)` puts everything on the field's metadata, and the CLI
(`raysparse.cli.flags`), the search-space parser and `check_settings` read it from there, so
adding a setting is one edit. Cross-field rules stay explicit code in each `validate()`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from raysparse.errors import ConfigError

_LABELS = {int: "an int", float: "a float", str: "a string", bool: "a bool", list: "a list", dict: "a mapping"}

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"

_HALF_LINE = re.compile(rf"^(>=|>)\s*({_NUMBER})$")

_INTERVAL = re.compile(rf"^([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])$")


@dataclass(frozen=True)
class Bounds:
    """Allowed numbers, written as the user reads them: '>= 1', '> 0', '[0, 1)', '(0, 1)'."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        text = text.strip()
        if match := _HALF_LINE.match(text):
            return cls(text, float(match[2]), math.inf, match[1] == ">=", False)
        if match := _INTERVAL.match(text):
            return cls(text, float(match[2]), float(match[3]), match[1] == "[", match[4] == "]")
        raise ValueError(f"bounds {text!r}: write '>= N', '> N' or an interval such as '[0, 1)'")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    @property
    def problem(self) -> str:
        """How a value outside reads: 'must be >= 0' for a half-line, 'is outside [0, 1)' otherwise."""
        return f"must be {self.text}" if math.isinf(self.high) else f"is outside {self.text}"


@dataclass(frozen=True)
class Declared:
    """What the author wrote in `setting(...)`; stored in the field's metadata."""

    help: str
    choices: tuple[str, ...] = ()
    within: Bounds | None = None
    also: tuple[type, ...] = ()
    flags: tuple[str, ...] = ()
    group: str | None = None
    fix: str = ""
    message: str | None = None
    shown: str | None = None
    cli: bool = True


_KEY = "raysparse.setting"


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            choices: typing.Sequence[str] = (), within: str | None = None, also: tuple[type, ...] = (),
            flags: typing.Sequence[str] = (), group: str | None = None, fix: str = "", message: str | None = None,
            shown: str | None = None, cli: bool = True) -> Any:
    """A dataclass field that also declares how the setting is offered and checked.

    default/factory: the value (its type is the field's annotation). help: one line for --help.
    choices: the allowed strings. within: allowed numbers ('>= 1', '[0, 1)'). also: types accepted
    besides the annotation (sparsity 0.5 as a float). flags: CLI aliases besides --the-name.
    group: the --help section. fix: the hint after a range or choice error. message: replaces the
    range error, a format string of {name}, {value} and {within}. shown: the default as --help
    prints it (for None defaults that mean 'from the model'). cli: False for a field with no flag.
    """
    if not help:
        raise TypeError("setting(): every setting needs a help line")
    declared = Declared(help=help, choices=tuple(choices), within=Bounds.parse(within) if within else None,
                        also=tuple(also), flags=tuple(flags), group=group, fix=fix, message=message, shown=shown,
                        cli=cli)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: declared})
    return dataclasses.field(default=default, metadata={_KEY: declared})


@dataclass(frozen=True, kw_only=True)
class Setting(Declared):
    """A field's declaration together with its name, default and the type read from its annotation."""

    name: str
    base: type
    optional: bool
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        text = _LABELS.get(self.base, str(self.base))
        return text + (" (or null)" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        """Is `value` of the setting's type (an int for a float, never a bool for a number)?"""
        if isinstance(value, bool):
            return self.base is bool or bool in self.also
        if isinstance(value, list) and list in self.also:
            return all(isinstance(item, str) for item in value)
        if isinstance(value, self.also):
            return True
        if self.base is float:
            return isinstance(value, (int, float))
        return isinstance(value, self.base)

    def check(self, value: Any) -> None:
        """Raise a one-line ConfigError naming the setting and the fix when `value` breaks the declaration."""
        name, within = self.name, self.within
        if value is None:
            if self.optional:
                return
            raise ConfigError(f"{name} cannot be null: it takes {self.label}")
        if self.base is int and (isinstance(value, bool) or not isinstance(value, int)
                                 or (within is not None and value not in within)):
            raise ConfigError(f"{name} must be an integer{' ' + within.text if within else ''}, got {value!r}"
                              + (f": {self.fix}" if self.fix and isinstance(value, int) else ""))
        if not self.accepts(value):
            raise ConfigError(f"{name} takes {self.label}, got {value!r}")
        if self.choices and isinstance(value, str) and value not in self.choices:
            raise ConfigError(f"unknown {name} '{value}': choose one of {', '.join(self.choices)}"
                              + (f"; {self.fix}" if self.fix else ""))
        if within is not None and not isinstance(value, bool) and value not in within:
            if self.message:
                raise ConfigError(self.message.format(name=name, value=value, within=within.text))
            raise ConfigError(f"{name} {value} {within.problem}" + (f": {self.fix}" if self.fix else ""))


def settings_of(cls: type) -> dict[str, Setting]:
    """Every field of a settings dataclass, in declaration order; a field not declared with
    `setting(...)` is an error, so no setting can miss its flag or its checks."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Setting] = {}
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_KEY)
        if declared is None:
            raise TypeError(f"{cls.__name__}.{f.name} is a plain field: declare it with setting(default, help=...)")
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        base = typing.get_origin(args[0]) or args[0]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        declaration = {d.name: getattr(declared, d.name) for d in dataclasses.fields(Declared)}
        out[f.name] = Setting(name=f.name, base=base, optional=union and type(None) in typing.get_args(hint),
                              default=default, **declaration)
    return out


def check_settings(obj: Any) -> None:
    """The one generic loop: every field's declared type, choices and bounds (cross-field rules
    are the caller's explicit code)."""
    for spec in settings_of(type(obj)).values():
        spec.check(getattr(obj, spec.name))


def from_mapping(cls: type, values: typing.Mapping[str, Any], source: str = "config") -> Any:
    """Build a settings dataclass from a plain mapping, naming unknown keys instead of ignoring them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; known settings are: " + ", ".join(sorted(known))
        )
    try:
        return cls(**dict(values))
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{source}: {exc}") from None
