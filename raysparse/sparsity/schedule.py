"""Pruning schedules: the cumulative sparsity to reach at each step.

Iterative magnitude pruning removes a fixed fraction `p` of the weights that are *still
non-zero* at every step, so density after n steps is (1-p)^n: 90% sparsity with p=0.1
takes ceil(ln 0.1 / ln 0.9) = 22 steps. The last step lands exactly on the target instead
of overshooting it, so trials with different `p` end at the same sparsity and compare fairly.
"""
from __future__ import annotations

import math

from raysparse.errors import ConfigError

SCHEDULES = ("oneshot", "iterative")

_EPS = 1e-9


def iterative_steps_needed(target: float, prune_percentage: float, start: float = 0.0) -> int:
    """How many steps of removing `prune_percentage` of the remaining weights reach `target`."""
    ratio = math.log((1.0 - target) / (1.0 - start)) / math.log(1.0 - prune_percentage)
    return max(1, math.ceil(ratio - _EPS))


def sparsity_schedule(
    schedule: str,
    target: float,
    prune_percentage: float = 0.1,
    start: float = 0.0,
    max_iterations: int = 100,
) -> list[float]:
    """Cumulative sparsity after each step, ending exactly on `target`."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{schedule}': choose {' or '.join(SCHEDULES)}")
    if not 0.0 <= start < 1.0:
        raise ConfigError(f"current sparsity {start} is outside [0, 1)")
    if target <= start + _EPS:
        raise ConfigError(
            f"target sparsity {target:g} is not above the model's current sparsity {start:.4f}: "
            "raise --target-sparsity (pruning cannot un-prune weights)"
        )
    if schedule == "oneshot":
        return [target]
    if not 0.0 < prune_percentage < 1.0:
        raise ConfigError(
            f"prune_percentage {prune_percentage} is outside (0, 1): it is the fraction of the remaining "
            "weights removed per iteration, e.g. 0.1"
        )
    steps = iterative_steps_needed(target, prune_percentage, start)
    if steps > max_iterations:
        raise ConfigError(
            f"reaching sparsity {target:g} with prune_percentage {prune_percentage:g} takes {steps} iterations, "
            f"more than max_iterations={max_iterations}: raise --max-iterations or --prune-percentage"
        )
    density = 1.0 - start
    levels = [1.0 - density * (1.0 - prune_percentage) ** k for k in range(1, steps)]
    return [level for level in levels if level < target - _EPS] + [target]
