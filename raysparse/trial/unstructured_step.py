"""Unstructured and N:M pruning as a trial step: masks from magnitude, Wanda or SparseGPT.

Each schedule iteration prunes the current (already pruned, recovered) model to the
iteration's level, and the new masks are ANDed with the previous ones: a weight pruned
once stays pruned, whatever the later scores say. The first step prunes the dense model,
whose result depends on nothing a trial's recovery settings change: it goes through the
cache (trial/statistics.py), so trials that differ only in recovery prune once.
"""
from __future__ import annotations

import dataclasses

from raysparse.prune import prune
from raysparse.sparsity.masks import Masks, apply_masks, measure_sparsity
from raysparse.trial.context import TrialContext
from raysparse.trial.state import TrialState
from raysparse.trial.statistics import prune_dense
from raysparse.trial.steps import StepOutcome, layer_ratios


def combine_masks(previous: Masks | None, new: Masks) -> Masks:
    """Pruned stays pruned: a later step can only add zeros to an earlier step's mask."""
    if previous is None:
        return new
    return {name: mask & previous[name] for name, mask in new.items()}


class UnstructuredStep:
    """Zero weights under a mask; the model keeps its shape."""

    def prune(self, ctx: TrialContext, state: TrialState, level: float, previous: Masks | None) -> StepOutcome:
        config, adapter = ctx.config, ctx.loaded.adapter
        step_config = config if config.pattern.is_nm else dataclasses.replace(config, sparsity=repr(level))
        layers = adapter.decoder_layers()
        sizes = [sum(m.weight.numel() for m in adapter.prunable_linears(layer).values()) for layer in layers]
        ratios = layer_ratios(ctx, state, level, range(len(layers)), sizes)
        with ctx.timer.phase("prune"):
            if previous is None:  # the dense model: the same pruning setting gives the same result (cached)
                masks = prune_dense(ctx, step_config, ratios)
            else:
                masks = combine_masks(previous, prune(adapter, step_config, ctx.calib, ctx.device, ratios))
                apply_masks(ctx.loaded.model, masks)
        return StepOutcome(masks, {"layer_ratios": ratios} if ratios is not None else {})

    def sparsity(self, ctx: TrialContext, outcome: StepOutcome) -> float:
        return measure_sparsity(ctx.loaded.adapter).overall
