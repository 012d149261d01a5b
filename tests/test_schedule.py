import math

import pytest

from raysparse.errors import ConfigError
from raysparse.sparsity.schedule import iterative_steps_needed, sparsity_schedule


@pytest.mark.parametrize("target,p,steps", [(0.9, 0.1, 22), (0.5, 0.1, 7), (0.95, 0.1, 29), (0.8, 0.2, 8)])
def test_iterative_steps_match_the_remaining_weights_rule(target, p, steps):
    levels = sparsity_schedule("iterative", target, p)
    assert len(levels) == steps == iterative_steps_needed(target, p)
    for n, level in enumerate(levels[:-1], start=1):
        assert 1 - level == pytest.approx((1 - p) ** n)  # density after n steps is (1-p)^n
    assert levels[-1] == target  # the last step lands exactly on the target
    assert all(a < b for a, b in zip(levels, levels[1:]))


def test_schedule_starts_from_the_current_sparsity():
    levels = sparsity_schedule("iterative", 0.9, 0.1, start=0.5)
    assert len(levels) == math.ceil(math.log(0.1 / 0.5) / math.log(0.9))
    assert 1 - levels[0] == pytest.approx(0.5 * 0.9)


def test_oneshot_is_one_step():
    assert sparsity_schedule("oneshot", 0.6) == [0.6]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(schedule="iterative", target=0.3, start=0.5), "not above the model's current sparsity"),
    (dict(schedule="iterative", target=0.5, prune_percentage=0.0), "outside (0, 1)"),
    (dict(schedule="iterative", target=0.5, prune_percentage=1.0), "outside (0, 1)"),
    (dict(schedule="iterative", target=0.9, prune_percentage=0.1, max_iterations=10), "takes 22 iterations"),
    (dict(schedule="gradual", target=0.5), "unknown schedule"),
])
def test_bad_schedules_say_what_to_change(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        sparsity_schedule(**kwargs)
    assert fragment in str(info.value)
