"""Pruners: one module per method, one entry point that dispatches on the config."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..masks import Masks
from ..models import ModelAdapter
from .layerwise import prune_layerwise
from .magnitude import prune_magnitude
from .sparsegpt import SparseGPTMethod, sparsegpt_reconstruct
from .wanda import WandaMethod

__all__ = ["prune", "prune_magnitude", "prune_layerwise", "WandaMethod", "SparseGPTMethod",
           "sparsegpt_reconstruct"]


def prune(adapter: ModelAdapter, config: PruneConfig, calib: torch.Tensor | None, device: torch.device) -> Masks:
    """Prune the model in place with `config.method`; return keep-masks by parameter name."""
    pattern = config.pattern
    if config.method == "magnitude":
        return prune_magnitude(adapter, pattern, config.magnitude_scope)
    if calib is None:
        raise ValueError(f"{config.method} needs calibration windows")
    method = (
        WandaMethod(pattern) if config.method == "wanda"
        else SparseGPTMethod(pattern, config.percdamp, config.blocksize)
    )
    return prune_layerwise(adapter, method, calib, device, config.calib_batch_size,
                           desc=f"{config.method} {pattern}")
