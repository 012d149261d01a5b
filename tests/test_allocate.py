"""Per-layer ratio allocation: clamps, exact overall target, ordering, and input errors."""
from __future__ import annotations

import pytest

from raysparse.errors import ConfigError
from raysparse.sparsity.allocate import allocate_ratios

SCORES = [0.9, 0.1, 0.5, 2.0, 0.05, 0.3]


def weighted_mean(ratios, sizes=None):
    sizes = sizes or [1] * len(ratios)
    return sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes)


@pytest.mark.parametrize("strategy", ["inverse", "proportional", "uniform"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("sizes", [None, [10, 1, 5, 3, 8, 2]])
@pytest.mark.parametrize("target", [0.16, 0.3, 0.49])
def test_clamped_and_on_target(strategy, alpha, sizes, target):
    ratios = allocate_ratios(SCORES, target, strategy=strategy, alpha=alpha, layer_sizes=sizes)
    assert len(ratios) == len(SCORES)
    assert all(0.15 <= r <= 0.5 for r in ratios)
    assert abs(weighted_mean(ratios, sizes) - target) < 1e-9


def test_aggressive_alpha_hits_clamps_and_still_meets_target():
    ratios = allocate_ratios(SCORES, 0.25, strategy="inverse", alpha=5.0, min_rate=0.1, max_rate=0.4)
    assert min(ratios) == pytest.approx(0.1) and max(ratios) == pytest.approx(0.4)
    assert abs(weighted_mean(ratios) - 0.25) < 1e-9


def test_alpha_zero_and_uniform_are_uniform():
    for strategy in ("inverse", "proportional"):
        assert allocate_ratios(SCORES, 0.3, strategy=strategy, alpha=0.0) == pytest.approx([0.3] * len(SCORES))
    assert allocate_ratios(SCORES, 0.3, strategy="uniform", alpha=2.0) == pytest.approx([0.3] * len(SCORES))
    assert allocate_ratios([1.0, 1.0, 1.0], 0.3) == pytest.approx([0.3] * 3)  # no spread in scores


def test_direction_of_strategies():
    top, bottom = SCORES.index(max(SCORES)), SCORES.index(min(SCORES))
    inverse = allocate_ratios(SCORES, 0.3, strategy="inverse", alpha=0.5)
    proportional = allocate_ratios(SCORES, 0.3, strategy="proportional", alpha=0.5)
    assert inverse[top] == min(inverse) and inverse[top] < inverse[bottom]
    assert proportional[top] == max(proportional) and proportional[top] > proportional[bottom]
    # order follows the scores (strictly, while no clamp binds)
    order = sorted(range(len(SCORES)), key=SCORES.__getitem__)
    assert all(inverse[a] > inverse[b] for a, b in zip(order, order[1:]))


def test_larger_alpha_spreads_more():
    mild = allocate_ratios(SCORES, 0.3, alpha=0.5)
    strong = allocate_ratios(SCORES, 0.3, alpha=1.0)
    assert max(strong) - min(strong) > max(mild) - min(mild)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=0.0), r"\(0, 1\)"),
        (dict(target=1.0), r"\(0, 1\)"),
        (dict(target=0.3, min_rate=0.4, max_rate=0.2), "min_rate 0.4 is larger than max_rate 0.2"),
        (dict(target=0.1), "below min_rate"),
        (dict(target=0.6), "above max_rate"),
        (dict(target=0.3, strategy="random"), "unknown"),
        (dict(target=0.3, alpha=-1.0), "alpha"),
        (dict(target=0.3, layer_sizes=[1, 2]), "layer_sizes"),
        (dict(target=0.3, scores=[]), "no layer importance"),
        (dict(target=0.3, scores=[1.0, float("nan")]), "NaN"),
    ],
)
def test_bad_inputs(kwargs, match):
    kwargs = dict(kwargs)
    scores = kwargs.pop("scores", SCORES)
    with pytest.raises(ConfigError, match=match):
        allocate_ratios(scores, **kwargs)
