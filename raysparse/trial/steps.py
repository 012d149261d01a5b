"""The pruning step of a trial iteration, as one interface.

The trial loop (runner.py) is the same for every method: prune to this iteration's level,
evaluate, recover, evaluate, verify. Only the pruning differs — zeroing weights under a
mask (magnitude, Wanda, SparseGPT) or removing whole units so the model shrinks
(structured). A `PruneStep` hides that difference, so the loop never branches on the
method and a new kind of pruning is one class, not an `if` in every phase.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from raysparse.sparsity.allocate import allocate_ratios
from raysparse.sparsity.masks import Masks
from raysparse.trial.context import TrialContext
from raysparse.trial.state import TrialState


@dataclass
class StepOutcome:
    """What a pruning step leaves: the masks recovery must keep, and its part of the record."""

    masks: Masks
    record: dict[str, Any] = field(default_factory=dict)


class PruneStep(Protocol):
    """One way of pruning a model to a level; called once per schedule iteration."""

    def prune(self, ctx: TrialContext, state: TrialState, level: float, previous: Masks | None) -> StepOutcome:
        """Prune the model in `ctx` in place to `level`; `previous` holds the last iteration's masks."""
        ...

    def sparsity(self, ctx: TrialContext, outcome: StepOutcome) -> float:
        """The sparsity the trial reports for this iteration (measured after recovery)."""
        ...


def layer_ratios(ctx: TrialContext, state: TrialState, level: float, indices: Sequence[int],
                 sizes: Sequence[int]) -> list[float] | None:
    """Per-layer ratios for the layers `indices` (weighted by `sizes`) from layer importance,
    or None for uniform pruning. Both kinds of step allocate through this one function."""
    config = ctx.config
    if ctx.profile_ratios is not None:  # a searched profile, scaled to this iteration's level
        scale = 1.0 if level == config.target_ratio else level / config.target_ratio
        return [min(ctx.profile_ratios[i] * scale, 0.99) for i in indices]
    if config.pruning_strategy == "uniform":
        return None
    scores = [state.layer_importance["scores"][i] for i in indices]
    return allocate_ratios(scores, level, config.pruning_strategy, config.alpha, config.min_pruning_rate,
                           config.max_pruning_rate, layer_sizes=list(sizes))
