"""The level grid of a profile search and the moves that keep the total sparsity exact.

A profile is one grid index per decoder layer. The grid is evenly spaced and holds the
target, so the uniform profile (every layer at the target) is a valid start, and a level
switch that raises one layer by k steps and lowers another layer of the same size by k
steps leaves the parameter-weighted total exactly where it was (EvoPress's budget-preserving
mutation). Everything here is pure: lists in, lists out.

A grid can also be *anchored* on a profile (`Grid` with a per-layer anchor): index j of layer
i then means anchor[i] + (levels[j] - target), so the anchor itself is the all-centre profile
(no rounding onto a common grid) and the same switches explore around it. Each layer keeps the
indices whose level lies in [0, 1) (`Grid.bounds`); moves and projections respect them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from raysparse.errors import ConfigError

DEFAULT_HALF_WIDTH = 0.25
DEFAULT_STEP = 0.05
_TOL = 1e-6


def default_levels(target: float, half_width: float = DEFAULT_HALF_WIDTH, step: float = DEFAULT_STEP) -> list[float]:
    """target +- half_width in `step`s, kept inside [0, 1)."""
    count = int(round(half_width / step))
    levels = [round(target + i * step, 6) for i in range(-count, count + 1)]
    return [lv for lv in levels if 0.0 <= lv < 1.0]


def parse_levels(text: str | Sequence[float] | None, target: float) -> list[float]:
    """The grid from `--profile-levels`: 'LO:HI:STEP', a comma list, or None (target +- 0.25 by 0.05).

    Refused (one line): a level outside [0, 1), an uneven grid, or one without the target.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"a profile search needs a fractional target sparsity in (0, 1), got {target}")
    if text is None or text == "":
        levels = default_levels(target)
    elif isinstance(text, str) and ":" in text:
        try:
            low, high, step = (float(part) for part in text.split(":"))
        except ValueError:
            raise ConfigError(f"--profile-levels {text!r}: write LO:HI:STEP, e.g. 0.45:0.95:0.05") from None
        if not step > 0 or high < low:
            raise ConfigError(f"--profile-levels {text!r}: need LO <= HI and STEP > 0")
        levels = [round(low + i * step, 6) for i in range(int(math.floor((high - low) / step + _TOL)) + 1)]
    else:
        items = text.split(",") if isinstance(text, str) else list(text)
        try:
            levels = sorted({round(float(str(item).strip()), 6) for item in items if str(item).strip()})
        except ValueError:
            raise ConfigError(f"--profile-levels {text!r}: write LO:HI:STEP or comma-separated fractions") from None
    bad = [lv for lv in levels if not 0.0 <= lv < 1.0]
    if bad:
        raise ConfigError(f"profile level {bad[0]} is outside [0, 1): every level is a fraction of weights removed")
    if len(levels) < 2:
        raise ConfigError(f"the profile grid {levels} has fewer than 2 levels: nothing to search")
    steps = [b - a for a, b in zip(levels, levels[1:])]
    if max(steps) - min(steps) > _TOL:
        raise ConfigError(f"the profile grid {levels} is not evenly spaced: a level switch would change the total "
                          "sparsity; give LO:HI:STEP")
    if not any(abs(lv - target) <= _TOL for lv in levels):
        raise ConfigError(f"the profile grid {levels[0]}..{levels[-1]} (step {steps[0]:.4g}) cannot reach the "
                          f"target {target}: the grid must contain it (shift LO so that target = LO + k*STEP)")
    return levels


def target_index(levels: Sequence[float], target: float) -> int:
    return min(range(len(levels)), key=lambda i: abs(levels[i] - target))


def weighted_sparsity(ratios: Sequence[float], sizes: Sequence[int]) -> float:
    """Parameter-weighted mean of per-layer ratios (on the grid or not)."""
    return sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes)


def same_ratios(a: Sequence[float], b: Sequence[float]) -> bool:
    """Two per-layer profiles are the same (ratios equal up to float noise)."""
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 for x, y in zip(a, b))


def total_sparsity(profile: Sequence[int], levels: Sequence[float], sizes: Sequence[int]) -> float:
    """Parameter-weighted mean level of a profile."""
    return weighted_sparsity([levels[i] for i in profile], sizes)


def _size_groups(sizes: Sequence[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for layer, size in enumerate(sizes):
        groups.setdefault(int(size), []).append(layer)
    return [g for g in groups.values() if len(g) >= 2]


Bounds = Sequence[tuple[int, int]]  # per layer: lowest and highest usable grid index


def _bounds(bounds: Bounds | None, num_levels: int, layers: int) -> Bounds:
    return bounds if bounds is not None else [(0, num_levels - 1)] * layers


def mutate(profile: Sequence[int], sizes: Sequence[int], num_levels: int, rng: random.Random,
           max_step: int = 1, bounds: Bounds | None = None) -> list[int]:
    """Raise one layer by k steps and lower another layer of the same size by k (1 <= k <= max_step).

    Returns the profile unchanged when no such move exists (one layer, or every pair blocked).
    """
    groups = _size_groups(sizes)
    limits = _bounds(bounds, num_levels, len(profile))
    for _ in range(100):
        if not groups:
            break
        group = rng.choice(groups)
        up, down = rng.sample(group, 2)
        k = rng.randint(1, max_step)
        if profile[up] + k <= limits[up][1] and profile[down] - k >= limits[down][0]:
            child = list(profile)
            child[up] += k
            child[down] -= k
            return child
    return list(profile)


def project(raw: Sequence[float], sizes: Sequence[int], num_levels: int, start: int,
            bounds: Bounds | None = None) -> list[int]:
    """Continuous per-layer grid positions -> integer indices whose per-size-group sum equals the
    all-`start` profile's, so the total sparsity is exactly the target (Optuna's proposals)."""
    limits = _bounds(bounds, num_levels, len(raw))
    result = [min(max(int(round(x)), lo), hi) for x, (lo, hi) in zip(raw, limits)]
    groups: dict[int, list[int]] = {}
    for layer, size in enumerate(sizes):
        groups.setdefault(int(size), []).append(layer)
    for members in groups.values():
        excess = sum(result[i] for i in members) - start * len(members)
        while excess != 0:
            # move the layer whose rounding went furthest the wrong way, within the grid
            if excess > 0:
                movable = [i for i in members if result[i] > limits[i][0]]
                i = max(movable, key=lambda j: result[j] - raw[j])
                result[i] -= 1
                excess -= 1
            else:
                movable = [i for i in members if result[i] < limits[i][1]]
                i = max(movable, key=lambda j: raw[j] - result[j])
                result[i] += 1
                excess += 1
    return result


def snap(ratios: Sequence[float], levels: Sequence[float], sizes: Sequence[int], target_idx: int) -> list[int]:
    """A profile of free per-layer ratios (importance, OWL, a saved file) -> the nearest grid profile
    at exactly the target: each ratio becomes a continuous grid position (clamped to the grid), then
    `project` restores every size group's budget. This is how a search starts from a heuristic."""
    step = levels[1] - levels[0]
    raw = [(r - levels[0]) / step for r in ratios]
    return project(raw, sizes, len(levels), target_idx)


@dataclass(frozen=True)
class Grid:
    """The levels each layer can take: anchor[i] + (levels[j] - target) for index j.

    An absolute grid has the target as every layer's anchor (index j is levels[j] everywhere);
    an anchored grid is centred on a profile, whose ratios need not lie on any common grid.
    """

    levels: tuple[float, ...]
    target: float
    anchor: tuple[float, ...]

    @classmethod
    def build(cls, levels: Sequence[float], target: float, anchor: Sequence[float] | int) -> "Grid":
        """`anchor`: per-layer ratios, or a layer count for the absolute grid."""
        ratios = [target] * anchor if isinstance(anchor, int) else [float(a) for a in anchor]
        bad = [a for a in ratios if not 0.0 <= a < 1.0]
        if bad:
            raise ConfigError(f"an anchor ratio {bad[0]} is outside [0, 1)")
        return cls(tuple(float(v) for v in levels), float(target), tuple(ratios))

    @property
    def centre(self) -> int:
        return target_index(self.levels, self.target)

    @property
    def anchored(self) -> bool:
        return any(abs(a - self.target) > _TOL for a in self.anchor)

    def ratio(self, layer: int, index: int) -> float:
        return round(self.anchor[layer] + self.levels[index] - self.levels[self.centre], 6)

    def ratios(self, profile: Sequence[int]) -> list[float]:
        return [self.ratio(layer, index) for layer, index in enumerate(profile)]

    def bounds(self) -> list[tuple[int, int]]:
        """Per layer, the first and last index whose level lies in [0, 1) (the centre always does)."""
        out = []
        for layer in range(len(self.anchor)):
            usable = [j for j in range(len(self.levels)) if 0.0 <= self.ratio(layer, j) < 1.0]
            out.append((usable[0], usable[-1]))
        return out

    def layer_levels(self, layer: int) -> list[float]:
        lo, hi = self.bounds()[layer]
        return [self.ratio(layer, j) for j in range(lo, hi + 1)]
