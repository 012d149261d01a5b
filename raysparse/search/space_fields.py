"""The type and allowed values of every TrialConfig field, as a space file is checked against them.

Nothing is listed here: types come from the annotations, allowed strings (`choices`) and the
other accepted types (`also`: sparsity 0.8, bf16 true) from each field's `setting(...)`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from raysparse.config import Setting, TrialConfig, settings_of
from raysparse.errors import ConfigError

FieldType = Setting  # what the space parser calls a field's declared type

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

_CATEGORICAL_TYPES = (type(None), bool, int, float, str)


def trial_fields() -> dict[str, FieldType]:
    """Map every TrialConfig field to its declaration (computed per call: no module-level cache)."""
    return settings_of(TrialConfig)


def _allowed_names(fields: Mapping[str, FieldType]) -> str:
    return ", ".join(sorted(fields))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def takes_floats(ftype: FieldType) -> bool:
    """Can a continuous distribution (uniform, loguniform, quniform) feed this field?"""
    return ftype.base is float or float in ftype.also


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
    if ftype.base is float and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if not ftype.accepts(value):
        raise ConfigError(f"{where}: {value!r} is a {type(value).__name__} but {name} takes {ftype.label}")
    if isinstance(value, str) and ftype.choices and value not in ftype.choices:
        raise ConfigError(f"{where}: {name} '{value}' is not allowed; choose one of {', '.join(ftype.choices)}")
    if ftype.base is float and not isinstance(value, ftype.also):
        return float(value)
    return value
