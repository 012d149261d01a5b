"""First-order Taylor importance of structural units: |w * dL/dw| summed per kv group or MLP channel.

Only the scored layers' weights get gradients, so the cost is one forward and backward pass
per window with the rest of the model frozen.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from raysparse.errors import ConfigError
from raysparse.models.adapters import ModelAdapter
from raysparse.models.resize import unit_params, unit_scores

logger = logging.getLogger(__name__)


@dataclass
class LayerUnitScores:
    """Taylor importance of every attention group and MLP channel of one decoder layer."""

    layer: int
    attention: list[float]
    mlp: list[float]


def layer_param_counts(adapter: ModelAdapter, layer_indices: Sequence[int]) -> list[int]:
    """Prunable parameters (attention groups + MLP channels) of each listed layer."""
    layers = adapter.decoder_layers()
    counts = []
    for index in layer_indices:
        layer = layers[index]
        att, mlp = adapter.attention_units(layer), adapter.mlp_units(layer)
        counts.append(att.count * unit_params(adapter, layer, att) + mlp.count * unit_params(adapter, layer, mlp))
    return counts


def taylor_scores(adapter: ModelAdapter, windows: torch.Tensor, layer_indices: Sequence[int],
                  device: torch.device, batch_size: int = 4) -> list[LayerUnitScores]:
    """|w * dL/dw| summed per unit, gradients of the mean loss over `windows`.

    Only the weights of the scored layers get gradients, so memory beyond inference is one
    gradient per scored weight (plus activations of one batch).
    """
    model = adapter.model
    layers = adapter.decoder_layers()
    watched: dict[int, dict[str, nn.Module]] = {}
    for index in layer_indices:
        layer = layers[index]
        names = [s.module for spec in (adapter.attention_units(layer), adapter.mlp_units(layer)) for s in spec.slices]
        watched[index] = {name: layer.get_submodule(name) for name in names}
    previous = {param: param.requires_grad for param in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for param in model.parameters():
            param.requires_grad_(False)
            param.grad = None
        for modules in watched.values():
            for module in modules.values():
                module.weight.requires_grad_(True)
        total = windows.shape[0]
        for start in tqdm(range(0, total, batch_size), desc="taylor importance", leave=False):
            batch = windows[start:start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise ConfigError("the loss is not finite on the Taylor importance data: check the model and data")
            (loss * batch.shape[0] / total).backward()
        results = []
        with torch.no_grad():
            for index, modules in watched.items():
                layer = layers[index]
                per_element = {}
                for name, module in modules.items():
                    grad = module.weight.grad
                    weight = module.weight.data
                    product = (weight.float() * grad.float()).abs()
                    per_element[name] = product.t() if adapter.is_transposed(module) else product
                results.append(LayerUnitScores(
                    layer=index,
                    attention=unit_scores(adapter.attention_units(layer), per_element).tolist(),
                    mlp=unit_scores(adapter.mlp_units(layer), per_element).tolist(),
                ))
        return results
    finally:
        for param, flag in previous.items():
            param.grad = None
            param.requires_grad_(flag)
        model.train(was_training)


def timed_taylor_scores(adapter: ModelAdapter, windows: torch.Tensor, layer_indices: Sequence[int],
                        device: torch.device, batch_size: int) -> dict[str, Any]:
    """Taylor scores as plain data (cacheable across a search's trials) with their cost."""
    started = time.perf_counter()
    scores = taylor_scores(adapter, windows, layer_indices, device, batch_size)
    return {"scores": [asdict(s) for s in scores], "seconds": time.perf_counter() - started}
