"""Where ASHA and Optuna compare trials: at sparsity rungs, with values at exactly the rung.

A trial reports after each pruning iteration at its own planned levels (26%, 52%, 78%, 80%
for a prune percentage of 0.26; 48%, 73%, 80% for 0.48). Comparing those reports as they
come puts a 26%-sparse perplexity beside a 48%-sparse one at the same rung, and Ray's ASHA
records a trial that jumped past a rung at its *next* report, so a 73%-sparse perplexity
was compared with others' 20%-sparse ones: trials with large prune percentages were stopped
for pruning faster, the bias the milestones exist to remove (measured in bench_search: every
trial with p > 0.4 was stopped). Instead each report is turned into values at the rungs it
crossed, interpolated in log-perplexity between the previous report (or the dense model)
and this one, so every trial is judged at the same sparsity, once per rung.

With `--fidelity epochs` (one-shot trials, whose only sparsity milestone is the target) the
rungs are recovery epochs instead: a trial reports after every epoch (`RECOVERY_EPOCH`, one
more each time, so each report lands on at most one rung, at its own value).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

MILESTONE = "sparsity_pct"  # the planned sparsity level of a report, in whole percent
BEFORE_PCT = "sparsity_pct_before"  # the level before this iteration pruned (0: the dense model)
BEFORE_VALUE = "val_ppl_before"  # the validation perplexity at that level
PROJECTED = "val_ppl_projected"  # the validation ppl of the model pruned one-shot to the target
RECOVERY_EPOCH = "recovery_epoch"  # recovery epochs the trial has trained so far (--fidelity epochs)
RECOVERY_EPOCH_BEFORE = "recovery_epoch_before"
# What ASHA's rungs and Optuna's steps count, per --fidelity: (time attribute, its previous value).
FIDELITY_KEYS = {"sparsity": (MILESTONE, BEFORE_PCT), "epochs": (RECOVERY_EPOCH, RECOVERY_EPOCH_BEFORE)}


def before_key(metric: str) -> str:
    """The report key holding `metric`'s value at the previous level (val_ppl -> val_ppl_before)."""
    return f"{metric}_before"


def asha_rungs(grace_pct: int, reduction_factor: float = 2, max_pct: int = 101) -> list[int]:
    """The rung levels Ray's ASHA builds for these settings, ascending (one bracket)."""
    count = int(math.log(max_pct / grace_pct) / math.log(reduction_factor) + 1)
    return [int(grace_pct * reduction_factor**k) for k in range(count)]


def value_at(level: float, before: tuple[float, float], after: tuple[float, float]) -> float:
    """Perplexity at `level` between two (level, perplexity) points, linear in log-perplexity."""
    (lo, lo_value), (hi, hi_value) = before, after
    if hi <= lo or level >= hi:
        return hi_value
    share = (level - lo) / (hi - lo)
    return math.exp(math.log(lo_value) + share * (math.log(hi_value) - math.log(lo_value)))


def crossed_rungs(result: Mapping[str, Any], metric: str, rungs: list[int],
                  fidelity: str = "sparsity") -> list[tuple[int, float]]:
    """(rung, value at the rung) for each rung this report reached for the first time, ascending.

    Without the previous point in the report (an older trial, or an epoch report), the
    report's own value stands for every rung it crossed: never better than the truth, since
    perplexity grows with sparsity (an epoch report crosses one rung at most).
    """
    time_attr, before_attr = FIDELITY_KEYS[fidelity]
    current = (float(result[time_attr]), float(result[metric]))
    before_value = result.get(before_key(metric)) if fidelity == "sparsity" else None
    previous = float(result.get(before_attr) or 0)
    usable = before_value is not None and math.isfinite(float(before_value)) and float(before_value) > 0 \
        and current[1] > 0 and math.isfinite(current[1])
    crossed = [rung for rung in rungs if previous < rung <= current[0]]
    if not usable:
        return [(rung, current[1]) for rung in crossed]
    return [(rung, value_at(rung, (previous, float(before_value)), current)) for rung in crossed]
