"""Physically remove structural units (attention groups, MLP channels) from decoder layers.

Structured pruning is only worth its accuracy cost if the model really gets smaller and
faster, so removed units are sliced out of the weights rather than zeroed. The same slicing
code serves two callers: the pruner (keep the units Taylor importance ranks highest) and
model loading (keep the first ``n`` units of a freshly built full-size model, on the meta
device, so a saved shrunk model's weights fit the modules they are loaded into).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from raysparse.models.adapters import LayerShape, ModelAdapter, UnitSlice, UnitSpec


def feature_index(unit_slice: UnitSlice, keep: torch.Tensor, count: int) -> torch.Tensor:
    """Feature positions (along the slice's axis) owned by the kept units, in order."""
    width, block = unit_slice.width, count * unit_slice.width
    within = (keep.view(-1, 1) * width + torch.arange(width, device=keep.device)).reshape(-1)
    return torch.cat([b * block + within for b in range(unit_slice.blocks)])


def unit_scores(spec: UnitSpec, per_element: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum a per-weight score (|w * g|, in (out, in) layout) over each unit's slices."""
    total = torch.zeros(spec.count, dtype=torch.float64)
    for unit_slice in spec.slices:
        scores = per_element[unit_slice.module]
        per_feature = scores.sum(dim=1 if unit_slice.axis == "out" else 0)
        per_unit = per_feature.reshape(unit_slice.blocks, spec.count, unit_slice.width).sum(dim=(0, 2))
        total += per_unit.double().cpu()
    return total


def unit_params(adapter: ModelAdapter, layer: nn.Module, spec: UnitSpec) -> int:
    """Parameters one unit owns (weights, plus output biases), for exact ratio accounting."""
    params = 0
    for unit_slice in spec.slices:
        module = layer.get_submodule(unit_slice.module)
        out_features, in_features = adapter.weight_matrix(module).shape
        other = in_features if unit_slice.axis == "out" else out_features
        params += unit_slice.width * unit_slice.blocks * other
        if unit_slice.axis == "out" and getattr(module, "bias", None) is not None:
            params += unit_slice.width * unit_slice.blocks
    return params


def _slice_module(adapter: ModelAdapter, module: nn.Module, axis: str, index: torch.Tensor) -> None:
    """Keep only `index` along `axis` of a Linear / Conv1D, updating its size attributes."""
    matrix = adapter.weight_matrix(module)
    kept = matrix.index_select(0 if axis == "out" else 1, index.to(matrix.device))
    requires_grad = module.weight.requires_grad
    module.weight = nn.Parameter(adapter.to_param_layout(module, kept).contiguous(), requires_grad=requires_grad)
    if axis == "out" and getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.data.index_select(0, index.to(module.bias.device)).contiguous(),
                                   requires_grad=module.bias.requires_grad)
    out_features, in_features = kept.shape
    if adapter.is_transposed(module):  # GPT-2 Conv1D
        module.nf, module.nx = out_features, in_features
    else:
        module.out_features, module.in_features = out_features, in_features


def _keep_units(adapter: ModelAdapter, layer: nn.Module, spec: UnitSpec, keep: torch.Tensor) -> None:
    if keep.numel() == spec.count:
        return
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every {spec.kind} unit of a layer: keep at least one")
    keep = torch.sort(keep.long().cpu()).values
    for unit_slice in spec.slices:
        _slice_module(adapter, layer.get_submodule(unit_slice.module), unit_slice.axis,
                      feature_index(unit_slice, keep, spec.count))


def shrink_layer(adapter: ModelAdapter, layer: nn.Module, keep_groups: torch.Tensor,
                 keep_channels: torch.Tensor) -> LayerShape:
    """Keep the given attention groups and MLP channels of one decoder layer; return its shape."""
    _keep_units(adapter, layer, adapter.attention_units(layer), keep_groups)
    _keep_units(adapter, layer, adapter.mlp_units(layer), keep_channels)
    shape = adapter.layer_shape(layer)
    adapter.set_attention_heads(layer, shape.num_heads)
    return shape


def layer_shapes(adapter: ModelAdapter) -> list[LayerShape]:
    return [adapter.layer_shape(layer) for layer in adapter.decoder_layers()]


def resize_to_shapes(adapter: ModelAdapter, shapes: Sequence[LayerShape]) -> None:
    """Give a full-size model the per-layer sizes of a saved shrunk one (weights load after)."""
    layers = adapter.decoder_layers()
    if len(shapes) != len(layers):
        raise ValueError(f"{len(shapes)} layer shapes for a model with {len(layers)} decoder layers")
    for layer, shape in zip(layers, shapes):
        # Explicit CPU indices: inside from_pretrained the default device is meta.
        shrink_layer(adapter, layer, torch.arange(shape.num_kv_heads, device="cpu"),
                     torch.arange(shape.intermediate_size, device="cpu"))
