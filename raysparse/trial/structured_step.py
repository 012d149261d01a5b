"""The structured-pruning step of a trial: Taylor scores, per-layer ratios, shrink, measure.

The loop in runner.py treats it like any other `PruneStep`: it returns masks (all True:
nothing is zeroed, the weights are gone) and a record that the summary and the search
report like any other pruning step.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from raysparse.metrics.latency import measure_latency
from raysparse.models.adapters import count_params
from raysparse.models.shrunk import mark_shrunk
from raysparse.sparsity.masks import Masks
from raysparse.structured.plan import prune_structured
from raysparse.structured.taylor import LayerUnitScores, layer_param_counts
from raysparse.trial.context import TrialContext
from raysparse.trial.state import TrialState
from raysparse.trial.statistics import taylor_scores
from raysparse.trial.steps import StepOutcome, layer_ratios

logger = logging.getLogger(__name__)


def prunable_params(ctx: TrialContext) -> int:
    return sum(w.numel() for w in ctx.loaded.adapter.prunable_weights().values())


class StructuredStep:
    """Remove whole kv groups and MLP channels (Taylor importance); the model gets smaller.

    Nothing is zeroed, so the masks it hands to recovery are all True; its sparsity is the
    fraction of the in-range prunable parameters that is gone.
    """

    def prune(self, ctx: TrialContext, state: TrialState, level: float, previous: Masks | None) -> StepOutcome:
        masks, record = shrink(ctx, state, level)
        return StepOutcome(masks, {"layer_ratios": record["layer_ratios"], "structured": record})

    def sparsity(self, ctx: TrialContext, outcome: StepOutcome) -> float:
        return outcome.record["structured"]["sparsity"]


def shrink(ctx: TrialContext, state: TrialState, level: float) -> tuple[Masks, dict[str, Any]]:
    """Shrink the model in place to `level` of its in-range prunable parameters."""

    settings, model, adapter = ctx.settings, ctx.loaded.model, ctx.loaded.adapter
    indices = list(range(settings.layer_start, settings.layer_end))
    params_before, prunable_before = count_params(model), prunable_params(ctx)
    # With --offload the layers stream through the device: the latency is measured the same way
    # (and says so in the record), a fair before/after comparison but not a serving latency.
    with ctx.timer.phase("latency"), ctx.on_device():
        latency_before = measure_latency(model, settings.context_length, ctx.device, seed=ctx.config.seed)
    with ctx.timer.phase("taylor"):
        taylor = taylor_scores(ctx, indices)
    scores = [LayerUnitScores(**entry) for entry in taylor["scores"]]
    sizes = layer_param_counts(adapter, indices)
    ratios = layer_ratios(ctx, state, level, indices, sizes) or [level] * len(indices)
    with ctx.timer.phase("prune"):
        result = prune_structured(adapter, scores, ratios)
        mark_shrunk(model)
    with ctx.timer.phase("latency"), ctx.on_device():
        latency_after = measure_latency(model, settings.context_length, ctx.device, seed=ctx.config.seed)
    params_after, prunable_after = count_params(model), prunable_params(ctx)
    per_layer = [0.0] * len(adapter.decoder_layers())
    for index, ratio in zip(indices, ratios):
        per_layer[index] = ratio
    record = dict(result.to_dict())
    record.update(
        taylor_seconds=round(float(taylor["seconds"]), 3),
        layer_range=[settings.layer_start, settings.layer_end],
        layer_ratios=per_layer,
        params_before=params_before, params_after=params_after,
        params_removed_fraction=1.0 - params_after / params_before,
        prunable_before=prunable_before, prunable_after=prunable_after,
        sparsity=1.0 - prunable_after / prunable_before,
        layer_shapes=getattr(model.config, "raysparse_layer_shapes", None),
        latency_before=latency_before.to_dict(), latency_after=latency_after.to_dict(),
        latency_offloaded=ctx.config.offload != "none",
        decode_speedup=latency_before.decode_ms_per_token / max(latency_after.decode_ms_per_token, 1e-9),
        prefill_speedup=latency_before.prefill_ms_per_token / max(latency_after.prefill_ms_per_token, 1e-9),
    )
    logger.info("structured: %s -> %s parameters (%.2f%% removed), decode %.3f -> %.3f ms/token",
                f"{params_before:,}", f"{params_after:,}", 100 * record["params_removed_fraction"],
                latency_before.decode_ms_per_token, latency_after.decode_ms_per_token)
    masks = {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in adapter.prunable_weights().items()}
    return masks, record
