"""Pruners: one module per method, one entry point that dispatches on the config."""
from __future__ import annotations

import torch

from raysparse.config import PruneConfig
from raysparse.models.adapters import ModelAdapter
from raysparse.prune.layerwise import prune_layerwise
from raysparse.prune.magnitude import prune_magnitude
from raysparse.prune.sparsegpt import SparseGPTMethod, sparsegpt_reconstruct
from raysparse.prune.wanda import WandaMethod
from raysparse.sparsity.masks import Masks
from raysparse.sparsity.pattern import SparsityPattern

__all__ = ["prune", "prune_magnitude", "prune_layerwise", "WandaMethod", "SparseGPTMethod",
           "sparsegpt_reconstruct"]


def prune(adapter: ModelAdapter, config: PruneConfig, calib: torch.Tensor | None, device: torch.device,
          layer_ratios: list[float] | None = None) -> Masks:
    """Prune the model in place with `config.method`; return keep-masks by parameter name.

    `layer_ratios` (one per decoder layer) replaces the uniform ratio, e.g. from allocation
    by layer importance.
    """
    pattern = config.pattern
    layer_patterns = [SparsityPattern(ratio=r) for r in layer_ratios] if layer_ratios is not None else None
    if config.method == "magnitude":
        return prune_magnitude(adapter, pattern, config.magnitude_scope, layer_patterns)
    if calib is None:
        raise ValueError(f"{config.method} needs calibration windows")
    method = (
        WandaMethod(pattern) if config.method == "wanda"
        else SparseGPTMethod(pattern, config.percdamp, config.blocksize)
    )
    return prune_layerwise(adapter, method, calib, device, config.calib_batch_size,
                           desc=f"{config.method} {pattern}", layer_patterns=layer_patterns,
                           passes=config.calibration_passes)
