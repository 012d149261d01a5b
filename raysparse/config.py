"""Typed, validated configuration for a pruning run.

The config is flat on purpose: a search space (YAML) and the CLI both address settings by
one name, and a best configuration written by a search must re-run unchanged through
`launch/prune.py --config FILE`. Validation happens here, before any model is loaded or
any file is written, so a bad value costs the user nothing but a one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

METHODS = ("magnitude", "wanda", "sparsegpt")
MAGNITUDE_SCOPES = ("layer", "global")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_WINDOW = 2048

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """What fraction of each weight matrix becomes zero, and in which shape.

    `N:M` follows the Wanda/SparseGPT code: N of every M consecutive weights along the
    input dimension are zero (2:4 and 4:8 are the 50% patterns sparse tensor cores run).
    """

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_sparsity(value: str | float) -> SparsityPattern:
    """Parse `0.5` or `"2:4"`; raise ConfigError with the fix when out of range."""
    if isinstance(value, str):
        match = _NM_RE.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if m < 2 or n < 1 or n >= m:
                raise ConfigError(
                    f"sparsity pattern '{value}' is invalid: N:M needs 1 <= N < M "
                    "(N zeros in every M weights), e.g. 2:4 or 4:8"
                )
            return SparsityPattern(ratio=n / m, n=n, m=m)
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"sparsity '{value}' is neither a fraction in [0, 1) nor an N:M pattern such as 2:4"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"sparsity must be a number in [0, 1) or an N:M string, got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(
            f"sparsity {value} is outside [0, 1): give the fraction of weights to remove, e.g. 0.5"
        )
    return SparsityPattern(ratio=float(value))


@dataclass
class PruneConfig:
    """Everything one pruning run needs. Defaults are the offline tiny preset, Wanda at 50%."""

    model: str = "tiny"
    method: str = "wanda"
    sparsity: str = "0.5"
    magnitude_scope: str = "layer"
    calib_data: str | None = None
    eval_data: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    eval_seqlen: int | None = None
    eval_stride: int | None = None
    eval_batch_size: int = 4
    eval_max_windows: int | None = None
    calib_batch_size: int = 8
    percdamp: float = 0.01
    blocksize: int = 128
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None
    save: bool = False
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, str):
            self.sparsity = str(self.sparsity)

    @property
    def pattern(self) -> SparsityPattern:
        return parse_sparsity(self.sparsity)

    def validate(self) -> "PruneConfig":
        """Check every setting that needs no model; raise ConfigError naming the fix."""
        self.pattern  # noqa: B018 - parsing validates
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.magnitude_scope not in MAGNITUDE_SCOPES:
            raise ConfigError(
                f"unknown magnitude_scope '{self.magnitude_scope}': choose 'layer' or 'global'"
            )
        if self.magnitude_scope == "global" and self.pattern.is_nm:
            raise ConfigError("magnitude_scope 'global' cannot make N:M patterns: use 'layer'")
        _positive_int("nsamples", self.nsamples)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("calib_batch_size", self.calib_batch_size)
        _positive_int("blocksize", self.blocksize)
        for name in ("seqlen", "eval_seqlen", "eval_stride", "eval_max_windows"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value, minimum=2 if "seqlen" in name else 1)
        if self.eval_stride is not None and self.eval_seqlen is not None and self.eval_stride > self.eval_seqlen:
            raise ConfigError(
                f"eval_stride {self.eval_stride} is larger than eval_seqlen {self.eval_seqlen}: "
                "tokens between windows would never be scored; use a stride <= the window"
            )
        if not 0.0 <= self.percdamp < 1.0:
            raise ConfigError(f"percdamp {self.percdamp} is outside [0, 1): the usual value is 0.01")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}': choose one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"unknown device '{self.device}': use auto, cpu, cuda or cuda:N")
        if self.save and not self.output:
            raise ConfigError("save is set but no output directory is given: add --output DIR")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "PruneConfig":
        """Build from a plain mapping, naming unknown keys instead of ignoring them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; known settings are: "
                + ", ".join(sorted(known))
            )
        try:
            return cls(**dict(values))
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "PruneConfig":
        """Read a JSON or YAML config file (a search's best_config.json, say)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text)
            else:
                values = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if isinstance(values, dict) and "config" in values and isinstance(values["config"], dict):
            values = values["config"]  # accept a summary.json directly
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of setting: value")
        return cls.from_dict(values, source=str(path))


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
