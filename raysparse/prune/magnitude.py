"""Magnitude pruning: remove the smallest |w|, per weight matrix or with one global threshold.

It needs no calibration data, which makes it the baseline every other method must beat
and the pruner that drives iterative schedules cheaply.
"""
from __future__ import annotations

import logging

import torch

from raysparse.models.adapters import ModelAdapter
from raysparse.prune.selection import nm_mask, whole_matrix_mask
from raysparse.sparsity.masks import Masks
from raysparse.sparsity.pattern import SparsityPattern

logger = logging.getLogger(__name__)


@torch.no_grad()
def prune_magnitude(adapter: ModelAdapter, pattern: SparsityPattern, scope: str = "layer",
                    layer_patterns: list[SparsityPattern] | None = None) -> Masks:
    """Zero the smallest weights in place and return the keep-masks (param-shaped).

    `layer_patterns` gives each decoder layer its own ratio (per-matrix scope only).
    """
    modules = adapter.prunable_modules()
    if layer_patterns is not None and scope == "global":
        raise ValueError("per-layer ratios and a global magnitude threshold exclude each other")
    if scope == "global":
        threshold = _global_threshold([m.weight.data for m in modules.values()], pattern.ratio)
        logger.info("global magnitude threshold %.3g", threshold)
    masks: Masks = {}
    for name, module in modules.items():
        if layer_patterns is not None:
            pattern = layer_patterns[int(name[len(adapter.layers_path) + 1:].split(".", 1)[0])]
        scores = adapter.weight_matrix(module).abs().float()
        if scope == "global":
            remove = scores <= threshold if pattern.ratio > 0 else torch.zeros_like(scores, dtype=torch.bool)
        elif pattern.is_nm:
            remove = nm_mask(scores, pattern.n, pattern.m)
        else:
            remove = whole_matrix_mask(scores, pattern.ratio)
        adapter.weight_matrix(module).masked_fill_(remove, 0)
        masks[f"{name}.weight"] = adapter.to_param_layout(module, ~remove).cpu()
    return masks


@torch.no_grad()
def _global_threshold(weights: list[torch.Tensor], ratio: float) -> float:
    """The |w| below which `ratio` of all weights fall, found by bisection on counts.

    Bisection never concatenates the weights, so a 7B model needs no extra 26 GB copy.
    """
    total = sum(w.numel() for w in weights)
    target = int(total * ratio)
    low, high = 0.0, max(float(w.abs().max()) for w in weights)
    for _ in range(60):
        mid = (low + high) / 2
        count = sum(int((w.abs() <= mid).sum()) for w in weights)
        if count < target:
            low = mid
        else:
            high = mid
    return high
