"""One trial end to end: load, evaluate dense, then for each schedule step prune, evaluate,
recover, evaluate; verify masks, write the summary (and the model).

`run_trial` is the single code path behind `launch/prune.py` and, later, every trial of a
search, so a number seen in a search is reproduced exactly by the CLI. Each finished
iteration is reported through a `Reporter` callback and checkpointed in the output folder;
starting the same trial again with the same `--output` continues after the last finished
iteration. Every setting that can be checked without weights is checked before anything is
loaded, and outputs are written through temporary files renamed into place, so a failed or
interrupted run never leaves a half-written summary or model.
"""
from __future__ import annotations

from raysparse.sparsity.allocate import allocate_ratios
from raysparse.sparsity.masks import Masks
from raysparse.trial.context import TrialContext
from raysparse.trial.state import TrialState


def layer_ratios(ctx: TrialContext, state: TrialState, level: float) -> list[float] | None:
    """Per-layer ratios for one schedule step, weighted by each layer's prunable parameters."""
    config = ctx.config
    if config.pruning_strategy == "uniform":
        return None

    sizes = [sum(m.weight.numel() for m in ctx.loaded.adapter.prunable_linears(layer).values())
             for layer in ctx.loaded.adapter.decoder_layers()]
    return allocate_ratios(state.layer_importance["scores"], level, config.pruning_strategy, config.alpha,
                           config.min_pruning_rate, config.max_pruning_rate, layer_sizes=sizes)


def _combine(previous: Masks | None, new: Masks) -> Masks:
    """Pruned stays pruned: a later step can only add zeros to an earlier step's mask."""
    if previous is None:
        return new
    return {name: mask & previous[name] for name, mask in new.items()}
