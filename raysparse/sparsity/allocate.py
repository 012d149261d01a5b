"""Per-layer pruning ratios from layer importance (unbalanced pruning, WORKFLOWS.md section 4).

Scheme (chosen for being predictable and exactly on target):

1. Normalise the scores to zero mean and unit range: ``z_i = (s_i - mean(s)) / (max(s) - min(s))``
   (all zeros when every score is equal), so ``alpha`` means the same on any model and for
   either importance method, whose raw scales differ by orders of magnitude.
2. Raw ratio ``r_i = target * (1 + alpha * direction * z_i)``, with direction -1 for
   ``inverse`` (important layers pruned less), +1 for ``proportional`` (important layers
   pruned more); ``uniform`` (or alpha=0) gives every layer ``target``. With alpha=1 the
   raw ratios span about ``target`` from least to most important layer; alpha=2 twice that.
3. Clamp to ``[min_rate, max_rate]`` and shift every ratio by one common offset ``t``
   (``clamp(r_i + t)``), with ``t`` solved so the size-weighted mean ratio is exactly
   ``target``. A common shift keeps the order of the layers, clamps never break the
   overall sparsity budget, and clamped layers automatically hand their share to the rest.
   The weighted mean of ``clamp(r_i + t)`` is continuous and non-decreasing in ``t``, from
   ``min_rate`` to ``max_rate``, so a solution exists whenever the target lies in between.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

from raysparse.errors import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("inverse", "proportional", "uniform")


def _validate(
    scores: Sequence[float],
    target: float,
    strategy: str,
    alpha: float,
    min_rate: float,
    max_rate: float,
    layer_sizes: Sequence[int] | None,
) -> list[float]:
    if strategy not in STRATEGIES:
        raise ConfigError(f"allocation strategy '{strategy}' is unknown; choose one of {', '.join(STRATEGIES)}")
    if len(scores) == 0:
        raise ConfigError("no layer importance scores given: cannot allocate per-layer ratios")
    values = [float(s) for s in scores]
    if not all(math.isfinite(s) for s in values):
        raise ConfigError("layer importance scores contain NaN or inf: recompute the importance")
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target pruning ratio must be in (0, 1), got {target}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"alpha must be >= 0 (0 = uniform), got {alpha}")
    if not 0.0 <= min_rate <= 1.0 or not 0.0 <= max_rate <= 1.0:
        raise ConfigError(f"min_rate and max_rate must lie in [0, 1], got {min_rate} and {max_rate}")
    if min_rate > max_rate:
        raise ConfigError(f"min_rate {min_rate} is larger than max_rate {max_rate}")
    if target < min_rate:
        raise ConfigError(
            f"target {target} is below min_rate {min_rate}: every layer would be pruned at least "
            f"{min_rate}, so the overall target cannot be met; lower min_rate or raise the target"
        )
    if target > max_rate:
        raise ConfigError(
            f"target {target} is above max_rate {max_rate}: no layer may be pruned more than "
            f"{max_rate}, so the overall target cannot be met; raise max_rate or lower the target"
        )
    if layer_sizes is not None:
        if len(layer_sizes) != len(values):
            raise ConfigError(f"layer_sizes has {len(layer_sizes)} entries but there are {len(values)} scores")
        if any(size <= 0 for size in layer_sizes):
            raise ConfigError("layer_sizes must all be positive")
    return values


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def allocate_ratios(
    scores: Sequence[float],
    target: float,
    strategy: str = "inverse",
    alpha: float = 1.0,
    min_rate: float = 0.15,
    max_rate: float = 0.5,
    layer_sizes: Sequence[int] | None = None,
) -> list[float]:
    """Pruning ratio per layer whose size-weighted mean is exactly `target` (see module doc).

    `layer_sizes` (e.g. prunable parameters per layer) weight the mean, so the overall
    fraction of removed weights is `target` even when layers differ in size; default equal.
    """
    values = _validate(scores, target, strategy, alpha, min_rate, max_rate, layer_sizes)
    weights = [float(s) for s in layer_sizes] if layer_sizes is not None else [1.0] * len(values)

    spread = max(values) - min(values)
    if strategy == "uniform" or alpha == 0 or spread == 0:
        raw = [target] * len(values)
    else:
        mean = sum(values) / len(values)
        direction = -1.0 if strategy == "inverse" else 1.0
        raw = [target * (1.0 + alpha * direction * (v - mean) / spread) for v in values]

    def mean_at(shift: float) -> float:
        return _weighted_mean([_clamp(r + shift, min_rate, max_rate) for r in raw], weights)

    # Bisection on the common shift: mean_at(low) == min_rate <= target <= max_rate == mean_at(high).
    low, high = min_rate - max(raw), max_rate - min(raw)
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mean_at(mid) < target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-15:
            break
    ratios = [_clamp(r + high, min_rate, max_rate) for r in raw]

    # Remove the last float residue exactly through the layers strictly inside the bounds.
    free = [i for i, r in enumerate(ratios) if min_rate < r < max_rate]
    if free:
        residual = (target - _weighted_mean(ratios, weights)) * sum(weights) / sum(weights[i] for i in free)
        if all(min_rate <= ratios[i] + residual <= max_rate for i in free):
            for i in free:
                ratios[i] += residual
    logger.info(
        "per-layer ratios (%s, alpha=%g, target %.4f, clamp [%g, %g]): %s", strategy, alpha, target,
        min_rate, max_rate, ", ".join(f"{r:.4f}" for r in ratios),
    )
    return ratios
