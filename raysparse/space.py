"""Search spaces: which TrialConfig settings a search holds fixed and which it samples.

A space is a YAML file with two sections, both keyed by `TrialConfig` field names (the same
flat names the CLI and `--config` files use, so a sampled configuration re-runs unchanged):

```yaml
description: iterative magnitude pruning of the tiny preset   # optional, recorded only
fixed:                       # constants, returned to Tune as part of every trial's config
  model: tiny
  sparsity: 0.8
params:                      # distributions, sampled in the order written here
  prune_percentage: {uniform: [0.1, 0.5]}            # float in [low, high]
  lr: {loguniform: [1.0e-4, 3.0e-3]}                 # float, log scale (low > 0)
  epochs_per_iteration: {int: [1, 3]}                # int; optional `step: 2` or `log: true`
  percdamp: {quniform: [0.01, 0.1, 0.01]}            # float on a grid: [low, high, step]
  recovery: {choice: [masked, lora]}                 # any of the listed values
  lora_r: {choice: [4, 8, 16], when: {recovery: lora}}  # sampled only when recovery == lora
```

`when: {key: value}` or `when: {key: [v1, v2]}` makes a parameter conditional: it is sampled
only when `key` (a fixed setting or a parameter listed above it) has one of the values; with
several keys all must hold. An inactive parameter is left out of the trial, so the
TrialConfig default applies.

Everything that can be checked without running a trial is checked by `load_space`: unknown
keys, ranges, value types against the TrialConfig field, enumerated values (method, schedule,
recovery, ...), conditions, and `TrialConfig.validate()` on the fixed settings combined with
each end of every range and each choice. A mistake in a space file therefore surfaces as one
ConfigError naming the file and the key before Ray starts, not as a failed trial an hour in.

The module holds no state and never imports optuna: the define-by-run function only calls
`trial.suggest_*`, so loading a space stays cheap and works without the search extras.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from .config import DTYPES, MAGNITUDE_SCOPES, METHODS, RECOVERIES, SCHEDULES, TrialConfig
from .errors import ConfigError

Kind = Literal["uniform", "loguniform", "int", "quniform", "choice"]
KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "quniform", "choice")
TOP_LEVEL_KEYS = ("description", "fixed", "params", "source")
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


# --------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Parameter specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One sampled setting: a distribution plus an optional condition.

    One class with a `kind` (rather than a class per distribution) keeps `to_dict`, the YAML
    parser and the samplers in one place; build specs with the named constructors.
    """

    kind: Kind
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    # -- constructors (Python names; the YAML keys are the `kind` strings) --------------

    @classmethod
    def uniform(cls, low: float, high: float, when: Mapping[str, Any] | None = None) -> "ParamSpec":
        return cls("uniform", float(low), float(high), when=_norm_when(when))

    @classmethod
    def loguniform(cls, low: float, high: float, when: Mapping[str, Any] | None = None) -> "ParamSpec":
        return cls("loguniform", float(low), float(high), log=True, when=_norm_when(when))

    @classmethod
    def integer(cls, low: int, high: int, step: int = 1, log: bool = False,
                when: Mapping[str, Any] | None = None) -> "ParamSpec":
        """The YAML `int` kind (named `integer` here so it does not shadow the builtin)."""
        return cls("int", low, high, step=step, log=log, when=_norm_when(when))

    @classmethod
    def quniform(cls, low: float, high: float, step: float, when: Mapping[str, Any] | None = None) -> "ParamSpec":
        return cls("quniform", float(low), float(high), step=float(step), when=_norm_when(when))

    @classmethod
    def choice(cls, choices: Sequence[Any], when: Mapping[str, Any] | None = None) -> "ParamSpec":
        return cls("choice", choices=tuple(choices), when=_norm_when(when))

    # -- behaviour -----------------------------------------------------------------------

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """True when every `when` key currently has one of its allowed values."""
        return all(key in values and _matches(values[key], allowed) for key, allowed in self.when.items())

    def top(self) -> float | int:
        """The largest value the distribution can return (high, snapped down to the grid)."""
        assert self.low is not None and self.high is not None
        if self.kind in ("int", "quniform") and self.step:
            n = math.floor((self.high - self.low) / self.step + 1e-9)
            value = self.low + n * self.step
            return int(value) if self.kind == "int" else _clean_float(value)
        return self.high

    def probe_values(self) -> list[Any]:
        """Values worth validating cheaply: both ends of a range, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.top()] if self.top() != self.low else [self.low]

    def first(self) -> Any:
        return self.probe_values()[0]

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an optuna trial (or Tune's wrapper around one) for this parameter."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "quniform":
            return trial.suggest_float(name, self.low, self.high, step=self.step)
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "loguniform")

    def sample(self, rng: random.Random) -> Any:
        """Draw with a stdlib RNG: the random-search baseline, independent of optuna."""
        if self.kind == "choice":
            return rng.choice(self.choices)
        assert self.low is not None and self.high is not None
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "quniform":
            assert self.step is not None
            n = math.floor((self.high - self.low) / self.step + 1e-9)
            return _clean_float(self.low + self.step * rng.randint(0, n))
        low, high, step = int(self.low), int(self.high), int(self.step or 1)
        if self.log:
            drawn = math.exp(rng.uniform(math.log(low - 0.5), math.log(high + 0.5)))
            return min(high, max(low, int(round(drawn))))
        return rng.randrange(low, high + 1, step)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, so a recorded space can be loaded again."""
        out: dict[str, Any]
        if self.kind == "choice":
            out = {"choice": list(self.choices)}
        elif self.kind == "quniform":
            out = {"quniform": [self.low, self.high, self.step]}
        else:
            out = {self.kind: [self.low, self.high]}
            if self.kind == "int":
                if self.step not in (None, 1):
                    out["step"] = self.step
                if self.log:
                    out["log"] = True
        if self.when:
            out["when"] = {k: (list(v) if len(v) > 1 else v[0]) for k, v in self.when.items()}
        return out


def _norm_when(when: Mapping[str, Any] | None) -> dict[str, tuple[Any, ...]]:
    if not when:
        return {}
    return {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in when.items()}


def _matches(value: Any, allowed: Sequence[Any]) -> bool:
    # `True == 1` in Python; compare types too so `when: {save: 1}` never matches True.
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def _clean_float(value: float) -> float:
    """Round grid points so 0.1 + 3 * 0.1 reads 0.4, as optuna's own grid values do."""
    return float(round(value, 12))


# --------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------


@dataclass
class SearchSpace:
    """Fixed settings plus sampled parameters (in sampling order), loaded from `source`."""

    fixed: dict[str, Any]
    params: dict[str, ParamSpec]
    source: str = "<search space>"
    description: str = ""

    def active_values(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Fixed settings plus the sampled values whose conditions hold, in space order.

        Conditions are evaluated in order against what is already decided, which is why a
        `when` may only refer to fixed keys and parameters listed above it.
        """
        values = dict(self.fixed)
        for name, spec in self.params.items():
            if not spec.is_active(values):
                continue
            if name not in sampled:
                raise ConfigError(f"{self.source}: no value for active parameter '{name}'")
            values[name] = sampled[name]
        return values

    def optuna_define_by_run(self) -> "DefineByRun":
        """The `space=` argument for `OptunaSearch`: suggests params, returns fixed settings."""
        return DefineByRun(self)

    def sample_config(self, trial_params: Mapping[str, Any]) -> TrialConfig:
        """Build the validated TrialConfig for one trial from Tune's config (or optuna's params).

        `trial_params` may hold the fixed settings too (Tune passes them back); they must
        match the space. Parameters whose condition does not hold are dropped, so a stale
        `lora_r` never reaches a trial that does masked recovery.
        """
        unknown = sorted(set(trial_params) - set(self.fixed) - set(self.params))
        if unknown:
            raise ConfigError(
                f"{self.source}: trial settings {', '.join(unknown)} are not in this space; "
                f"it defines {', '.join(list(self.fixed) + list(self.params))}"
            )
        for key in set(trial_params) & set(self.fixed):
            if trial_params[key] != self.fixed[key]:
                raise ConfigError(
                    f"{self.source}: trial setting {key}={trial_params[key]!r} contradicts the fixed "
                    f"value {self.fixed[key]!r}; was the trial sampled from another space?"
                )
        values = self.active_values(trial_params)
        try:
            return TrialConfig.from_dict(values, source=self.source).validate()
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: sampled settings {_brief(values, self.params)} are invalid: {exc}") from None

    def random_params(self, rng: random.Random) -> dict[str, Any]:
        """Draw the active parameters only (same conditions as the optuna path)."""
        values = dict(self.fixed)
        drawn: dict[str, Any] = {}
        for name, spec in self.params.items():
            if spec.is_active(values):
                values[name] = drawn[name] = spec.sample(rng)
        return drawn

    def random_config(self, rng: random.Random) -> TrialConfig:
        """One random-search trial: the baseline a model-based sampler has to beat."""
        return self.sample_config(self.random_params(rng))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a search's record; `parse_space(space.to_dict())` rebuilds it."""
        out: dict[str, Any] = {"source": self.source}
        if self.description:
            out["description"] = self.description
        out["fixed"] = dict(self.fixed)
        out["params"] = {name: spec.to_dict() for name, spec in self.params.items()}
        return out


@dataclass(frozen=True)
class DefineByRun:
    """Define-by-run function for `OptunaSearch(space=...)`.

    A module-level callable object rather than a closure because OptunaSearch pickles its
    whole state (space included) when Tune checkpoints the searcher.
    """

    space: SearchSpace

    def __call__(self, trial: Any) -> dict[str, Any]:
        values = dict(self.space.fixed)
        for name, spec in self.space.params.items():
            if spec.is_active(values):
                values[name] = spec.suggest(trial, name)
        # OptunaSearch merges the suggested values with what we return (the constants).
        return dict(self.space.fixed)


def _brief(values: Mapping[str, Any], params: Mapping[str, ParamSpec]) -> str:
    return "{" + ", ".join(f"{k}={values[k]!r}" for k in params if k in values) + "}"


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------


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
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse search space {path}: {exc}") from None
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
    numeric_field = ftype.base in (int, float) or float in EXTRA_TYPES.get(ftype.name, ())
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
    if not (ftype.base is float or float in EXTRA_TYPES.get(ftype.name, ())):
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
