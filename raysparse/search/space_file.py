"""Reading a search space file: YAML with unique keys, every key checked against the
TrialConfig field it names (type, allowed values, ranges, conditions), and the fixed settings
validated with each end of every range, so a bad space fails before Ray starts."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError, parse_error_line
from raysparse.search.space import KINDS, TOP_LEVEL_KEYS, ParamSpec, SearchSpace, _brief, _clean_float, _matches
from raysparse.search.space_fields import (
    _CATEGORICAL_TYPES,
    _FLOAT_RE,
    FieldType,
    _allowed_names,
    _coerce_value,
    _is_number,
    takes_floats,
    trial_fields,
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: PyYAML would silently keep the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_space(path: str | Path) -> SearchSpace:
    """Read and fully validate a YAML search space; every mistake is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse search space {path}: {parse_error_line(exc)}") from None
    return parse_space(data, source=str(path))


def parse_space(data: Any, source: str | None = None) -> SearchSpace:
    """Validate already-parsed data (a YAML document or `SearchSpace.to_dict()`).

    `source` names the origin in messages; by default a recorded space's own `source`.
    """
    if source is None:
        recorded = data.get("source") if isinstance(data, dict) else None
        source = recorded if isinstance(recorded, str) else "<search space>"
    if data is None:
        raise ConfigError(f"{source}: the search space is empty; it needs a 'params' section of distributions")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a search space is a mapping with 'fixed' and 'params', got {type(data).__name__}")
    extra = sorted(set(map(str, data)) - set(TOP_LEVEL_KEYS))
    if extra:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(extra)}; allowed: fixed, params, description "
            "(settings go under 'fixed' or 'params')"
        )
    fields = trial_fields()
    fixed = _parse_fixed(data.get("fixed"), fields, source)
    raw_params = data.get("params")
    if not raw_params:
        raise ConfigError(
            f"{source}: no params to search; add a 'params' section, e.g. lr: {{loguniform: [1.0e-5, 1.0e-3]}}"
        )
    if not isinstance(raw_params, dict):
        raise ConfigError(f"{source}: 'params' must map setting names to distributions, got {type(raw_params).__name__}")
    params: dict[str, ParamSpec] = {}
    for name, raw in raw_params.items():
        name = _check_key(name, fields, source, "params")
        if name in fixed:
            raise ConfigError(
                f"{source}: '{name}' is in both fixed and params; keep it in one (fixed holds it constant, "
                "params searches it)"
            )
        params[name] = _parse_param(name, raw, fields[name], fixed, params, raw_params, fields, source)
    description = data.get("description") or ""
    space = SearchSpace(fixed=fixed, params=params, source=source, description=str(description))
    _validate_against_config(space)
    return space


def _check_key(name: Any, fields: Mapping[str, FieldType], source: str, section: str) -> str:
    if not isinstance(name, str) or name not in fields:
        raise ConfigError(
            f"{source}: unknown setting '{name}' in {section}; allowed TrialConfig fields are: "
            + _allowed_names(fields)
        )
    return name


def _parse_fixed(raw: Any, fields: Mapping[str, FieldType], source: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'fixed' must map setting names to values, got {type(raw).__name__}")
    fixed: dict[str, Any] = {}
    for name, value in raw.items():
        name = _check_key(name, fields, source, "fixed")
        if isinstance(value, dict):
            raise ConfigError(
                f"{source}: fixed.{name} is a mapping; fixed holds constants (move distributions to params)"
            )
        fixed[name] = _coerce_value(fields[name], value, f"{source}: fixed.{name}")
    return fixed


def _bound(value: Any, where: str, what: str) -> float:
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if not _is_number(value):
        raise ConfigError(f"{where}: {what} {value!r} is not a number")
    return value


def _parse_param(
    name: str,
    raw: Any,
    ftype: FieldType,
    fixed: Mapping[str, Any],
    earlier: Mapping[str, ParamSpec],
    raw_params: Mapping[str, Any],
    fields: Mapping[str, FieldType],
    source: str,
) -> ParamSpec:
    where = f"{source}: params.{name}"
    form = "{uniform: [low, high]}, {loguniform: [low, high]}, {int: [low, high]}, {quniform: [low, high, step]} or {choice: [...]}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a distribution such as {form}; constants go under 'fixed'")
    kinds = [k for k in raw if k in KINDS]
    if len(kinds) != 1:
        found = f"found {', '.join(map(str, kinds))}" if kinds else "found none"
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)} ({found}); e.g. {form}")
    kind = kinds[0]
    allowed_extra = {"when"} | ({"step", "log"} if kind == "int" else set())
    extra = sorted(set(map(str, raw)) - {kind} - allowed_extra)
    if extra:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(extra)} for a {kind} parameter; allowed: "
            + ", ".join([kind, *sorted(allowed_extra)])
        )
    when = _parse_when(name, raw.get("when"), fixed, earlier, raw_params, fields, source)
    body = raw[kind]
    if kind == "choice":
        return ParamSpec.choice(_parse_choices(body, ftype, where), when=when)
    return _parse_range(kind, body, raw, ftype, where, when)


def _parse_choices(body: Any, ftype: FieldType, where: str) -> list[Any]:
    if not isinstance(body, list) or not body:
        raise ConfigError(f"{where}: choice needs a non-empty list of values, e.g. {{choice: [a, b]}}")
    choices = []
    for value in body:
        if not isinstance(value, _CATEGORICAL_TYPES):
            raise ConfigError(f"{where}: choice {value!r} is a {type(value).__name__}; choices must be scalars")
        choices.append(_coerce_value(ftype, value, f"{where} choice"))
    duplicates = sorted({repr(c) for c in choices if sum(_matches(c, (d,)) for d in choices) > 1})
    if duplicates:
        raise ConfigError(f"{where}: choice lists {', '.join(duplicates)} more than once")
    return choices


def _parse_range(kind: str, body: Any, raw: Mapping[str, Any], ftype: FieldType, where: str,
                 when: Mapping[str, Any]) -> ParamSpec:
    arity = 3 if kind == "quniform" else 2
    shape = "[low, high, step]" if arity == 3 else "[low, high]"
    if not isinstance(body, list) or len(body) != arity:
        raise ConfigError(f"{where}: {kind} takes {shape}, got {body!r}")
    numeric_field = ftype.base is int or takes_floats(ftype)
    if kind == "int":
        if ftype.base is not int:
            hint = "use uniform/loguniform/quniform" if numeric_field else "use choice: [...]"
            raise ConfigError(f"{where}: int draws integers but {ftype.name} takes {ftype.label}; {hint}")
        low, high = body
        step = raw.get("step", 1)
        log = raw.get("log", False)
        for what, value in (("low", low), ("high", high), ("step", step)):
            if not (isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(f"{where}: int {what} {value!r} is not an integer ({ftype.name} takes an int)")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log must be true or false, got {log!r}")
        _check_order(low, high, where, kind)
        if step <= 0:
            raise ConfigError(f"{where}: step {step} must be > 0")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log-scale int range needs low > 0, got {low}")
        if log and step != 1:
            raise ConfigError(f"{where}: log: true works only with step 1 (optuna cannot combine them)")
        _check_grid(low, high, step, where)
        return ParamSpec.integer(low, high, step=step, log=log, when=when)
    if not takes_floats(ftype):
        hint = "use int: [low, high]" if ftype.base is int else "use choice: [...]"
        raise ConfigError(f"{where}: {kind} draws floats but {ftype.name} takes {ftype.label}; {hint}")
    low = _bound(body[0], where, "low")
    high = _bound(body[1], where, "high")
    _check_order(low, high, where, kind)
    if kind == "loguniform":
        if low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (log scale), got {low}")
        return ParamSpec.loguniform(low, high, when=when)
    if kind == "quniform":
        step = _bound(body[2], where, "step")
        if step <= 0:
            raise ConfigError(f"{where}: step {step} must be > 0")
        _check_grid(low, high, step, where)
        return ParamSpec.quniform(low, high, step, when=when)
    return ParamSpec.uniform(low, high, when=when)


def _check_order(low: float, high: float, where: str, kind: str) -> None:
    if low >= high:
        raise ConfigError(
            f"{where}: {kind} range [{low}, {high}] is empty or reversed; low must be < high "
            "(put a single value under 'fixed')"
        )


def _check_grid(low: float, high: float, step: float, where: str) -> None:
    """Optuna silently lowers `high` onto the grid; say so up front instead."""
    n = (high - low) / step
    if abs(n - round(n)) > 1e-6:
        top = low + math.floor(n + 1e-9) * step
        raise ConfigError(
            f"{where}: high {high} is not low {low} plus a whole number of steps {step}; "
            f"the largest reachable value would be {_clean_float(top)}: use that as high"
        )


def _parse_when(
    name: str,
    raw: Any,
    fixed: Mapping[str, Any],
    earlier: Mapping[str, ParamSpec],
    raw_params: Mapping[str, Any],
    fields: Mapping[str, FieldType],
    source: str,
) -> dict[str, Any]:
    where = f"{source}: params.{name} when"
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping {{other_key: value or [values]}}, got {raw!r}")
    when: dict[str, Any] = {}
    for key, allowed in raw.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(
                f"{where}: unknown setting '{key}'; allowed TrialConfig fields are: " + _allowed_names(fields)
            )
        values = allowed if isinstance(allowed, list) else [allowed]
        if not values:
            raise ConfigError(f"{where}: {key} lists no values")
        values = [_coerce_value(fields[key], v, f"{where} {key}") for v in values]
        if key == name:
            raise ConfigError(f"{where}: '{name}' cannot depend on itself (circular condition)")
        if key in fixed:
            if not _matches(fixed[key], values):
                raise ConfigError(
                    f"{where}: {key} is fixed to {fixed[key]!r}, so the condition {key} in {values!r} never "
                    f"holds and {name} would never be sampled; drop the condition or the parameter"
                )
        elif key in earlier:
            _check_condition_values(earlier[key], key, values, where)
        elif key in raw_params:
            if _depends_on(raw_params, key, name, set()):
                raise ConfigError(
                    f"{where}: '{key}' and '{name}' depend on each other (circular condition); "
                    "a condition may only refer to a fixed key or a parameter listed above it"
                )
            raise ConfigError(
                f"{where}: '{key}' is defined later in params; a condition may only refer to a fixed key "
                f"or a parameter listed above it: move '{key}' above '{name}'"
            )
        else:
            choices = ", ".join(list(fixed) + list(earlier)) or "none"
            raise ConfigError(
                f"{where}: '{key}' is neither fixed nor searched in this space; conditions may refer to "
                f"fixed keys or params listed above it ({choices})"
            )
        when[key] = values
    return when


def _depends_on(raw_params: Mapping[str, Any], start: str, target: str, seen: set[str]) -> bool:
    """Does parameter `start` (transitively, through `when`) depend on `target`?"""
    if start in seen:
        return False
    seen.add(start)
    spec = raw_params.get(start)
    keys = spec.get("when") if isinstance(spec, dict) else None
    if not isinstance(keys, dict):
        return False
    return any(k == target or _depends_on(raw_params, k, target, seen) for k in keys)


def _check_condition_values(spec: ParamSpec, key: str, values: Sequence[Any], where: str) -> None:
    if spec.kind == "choice":
        missing = [v for v in values if not _matches(v, spec.choices)]
        if missing:
            raise ConfigError(
                f"{where}: {key} can never be {', '.join(map(repr, missing))}; its choices are {list(spec.choices)!r}"
            )
    elif spec.kind == "int":
        assert spec.low is not None and spec.high is not None
        bad = [v for v in values if not (isinstance(v, int) and spec.low <= v <= spec.high
                                         and (v - spec.low) % int(spec.step or 1) == 0)]
        if bad:
            raise ConfigError(f"{where}: {key} is drawn from int {[spec.low, spec.high]} and can never be {bad!r}")
    else:
        raise ConfigError(
            f"{where}: {key} is a continuous ({spec.kind}) parameter, so an equality condition would almost "
            f"never hold; make {key} a choice or an int"
        )


def _validate_against_config(space: SearchSpace) -> None:
    """Run TrialConfig.validate() on the fixed settings with each param's first value, then on
    every end of every range and every choice (conditions forced to hold), naming the key."""
    baseline = _resolve(space, {})
    try:
        TrialConfig.from_dict(baseline, source=space.source).validate()
    except ConfigError as exc:
        raise ConfigError(
            f"{space.source}: the fixed settings with every param at its first value "
            f"{_brief(baseline, space.params)} fail validation: {exc}"
        ) from None
    for name, spec in space.params.items():
        forced = _forced_conditions(space, name)
        for value in spec.probe_values():
            values = _resolve(space, {**forced, name: value})
            if name not in values:
                raise ConfigError(
                    f"{space.source}: params.{name}: its conditions {dict(spec.when)!r} can never hold together, "
                    "so it would never be sampled"
                )
            try:
                TrialConfig.from_dict(values, source=space.source).validate()
            except ConfigError as exc:
                others = {k: v for k, v in values.items() if k in space.params and k != name}
                raise ConfigError(
                    f"{space.source}: params.{name} value {value!r} fails validation "
                    f"(with {others or 'the fixed settings'}): {exc}"
                ) from None


def _forced_conditions(space: SearchSpace, name: str) -> dict[str, Any]:
    """Values for the params that `name`'s condition (transitively) needs, so a conditional
    parameter is probed in a configuration where it actually applies."""
    forced: dict[str, Any] = {}
    pending = [name]
    while pending:
        spec = space.params[pending.pop()]
        for key, allowed in spec.when.items():
            if key in space.params and key not in forced:
                forced[key] = allowed[0]
                pending.append(key)
    return forced


def _resolve(space: SearchSpace, overrides: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(space.fixed)
    for name, spec in space.params.items():
        if spec.is_active(values):
            values[name] = overrides[name] if name in overrides else spec.first()
    return values
