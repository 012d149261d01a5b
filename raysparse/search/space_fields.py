"""The type and allowed values of every TrialConfig field, as a space file is checked against them."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from raysparse.config import DTYPES, MAGNITUDE_SCOPES, METHODS, RECOVERIES, SCHEDULES, TrialConfig
from raysparse.errors import ConfigError

# Fields whose values come from a closed list: a wrong value is reported with the list.
ENUM_FIELDS: Mapping[str, Sequence[str]] = {
    "method": METHODS,
    "schedule": SCHEDULES,
    "recovery": RECOVERIES,
    "magnitude_scope": MAGNITUDE_SCOPES,
    "dtype": DTYPES,
}


# str fields that TrialConfig also accepts as other types (sparsity 0.8, bf16 true).
EXTRA_TYPES: Mapping[str, tuple[type, ...]] = {
    "sparsity": (int, float),
    "bf16": (bool,),
}


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


_CATEGORICAL_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class FieldType:
    """The Python type a TrialConfig field takes, read once from its annotation."""

    name: str
    base: type
    optional: bool

    @property
    def label(self) -> str:
        text = {int: "an int", float: "a float", str: "a string", bool: "a bool"}.get(self.base, str(self.base))
        return text + (" (or null)" if self.optional else "")


def trial_fields() -> dict[str, FieldType]:
    """Map every TrialConfig field to its type (computed per call: no module-level cache)."""
    hints = typing.get_type_hints(TrialConfig)
    out: dict[str, FieldType] = {}
    for f in dataclasses.fields(TrialConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        bases = [a for a in args if a is not type(None)] if args else [hint]
        out[f.name] = FieldType(f.name, bases[0], optional)
    return out


def _allowed_names(fields: Mapping[str, FieldType]) -> str:
    return ", ".join(sorted(fields))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_value(ftype: FieldType, value: Any, where: str) -> Any:
    """Return `value` checked (and, for floats, normalised) for field `ftype`, or raise.

    PyYAML reads `1e-4` (no dot) as a string; for float fields such strings are accepted as
    numbers because that is what the author meant.
    """
    name = ftype.name
    if value is None:
        if ftype.optional:
            return None
        raise ConfigError(f"{where}: {name} cannot be null; it takes {ftype.label}")
    extra = EXTRA_TYPES.get(name, ())
    if isinstance(value, extra) and not (isinstance(value, bool) and bool not in extra):
        return value
    if ftype.base is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if _is_number(value):
            return float(value)
    elif ftype.base is int:
        if _is_number(value) and isinstance(value, int):
            return value
    elif ftype.base is bool:
        if isinstance(value, bool):
            return value
    elif ftype.base is str:
        if isinstance(value, str):
            if name in ENUM_FIELDS and value not in ENUM_FIELDS[name]:
                raise ConfigError(
                    f"{where}: {name} '{value}' is not allowed; choose one of {', '.join(ENUM_FIELDS[name])}"
                )
            return value
        if name == "lora_target_modules" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise ConfigError(f"{where}: {value!r} is a {type(value).__name__} but {name} takes {ftype.label}")
