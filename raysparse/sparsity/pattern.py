"""The sparsity pattern a pruner aims for: a fraction, or N:M groups along the input dimension."""
from __future__ import annotations

import re
from dataclasses import dataclass

from raysparse.errors import ConfigError

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
