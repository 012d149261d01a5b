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

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError

Kind = Literal["uniform", "loguniform", "int", "quniform", "choice"]

KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "quniform", "choice")

TOP_LEVEL_KEYS = ("description", "fixed", "params", "source")


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
