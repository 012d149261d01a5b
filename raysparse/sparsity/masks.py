"""Sparsity masks: apply, measure, verify, save and load.

A mask is a bool tensor shaped like its parameter, True where the weight is kept. Reported
sparsity is always measured from the weights themselves (never from the masks or the
request), so a bug that un-zeroes a weight shows up in every summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.models.adapters import ModelAdapter

MASKS_FILE = "masks.safetensors"

Masks = dict[str, torch.Tensor]


class MaskViolation(AssertionError):
    """Pruned positions hold non-zero values: sparsity drifted."""


@dataclass
class SparsityReport:
    """Zero fraction of every prunable weight, per decoder layer, and overall."""

    overall: float
    total_params: int
    zero_params: int
    per_weight: dict[str, float] = field(default_factory=dict)
    per_layer: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "total_params": self.total_params,
            "zero_params": self.zero_params,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            "per_weight": self.per_weight,
        }

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'sparsity':>8}"]
        lines += [f"{index:>5}  {value:8.4f}" for index, value in self.per_layer.items()]
        lines.append(f"{'all':>5}  {self.overall:8.4f}  ({self.zero_params:,} / {self.total_params:,} zero)")
        return "\n".join(lines)


def _layer_index(name: str, adapter: ModelAdapter) -> int:
    return int(name[len(adapter.layers_path) + 1 :].split(".", 1)[0])


@torch.no_grad()
def measure_sparsity(adapter: ModelAdapter) -> SparsityReport:
    """Count exact zeros in every prunable weight (works on sharded DTensors too via full_tensor)."""
    per_weight: dict[str, float] = {}
    layer_totals: dict[int, list[int]] = {}
    total = zeros = 0
    for name, param in adapter.prunable_weights().items():
        data = param.detach()
        if hasattr(data, "full_tensor"):
            data = data.full_tensor()
        n, z = data.numel(), int((data == 0).sum())
        per_weight[name] = z / n
        bucket = layer_totals.setdefault(_layer_index(name, adapter), [0, 0])
        bucket[0] += n
        bucket[1] += z
        total += n
        zeros += z
    per_layer = {index: z / n for index, (n, z) in sorted(layer_totals.items())}
    return SparsityReport(zeros / max(total, 1), total, zeros, per_weight, per_layer)


@torch.no_grad()
def masks_from_weights(adapter: ModelAdapter) -> Masks:
    """The current sparsity pattern as masks (True = non-zero, kept)."""
    return {name: (param.detach() != 0).cpu() for name, param in adapter.prunable_weights().items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every masked-out position in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params[name]
        param.data.mul_(mask.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def verify_masks(model: nn.Module, masks: Masks) -> None:
    """Raise MaskViolation naming the weights whose pruned positions are no longer zero."""
    params = dict(model.named_parameters())
    bad = []
    for name, mask in masks.items():
        if name not in params:
            raise MaskViolation(f"mask for {name} has no matching parameter in the model")
        values = params[name].detach()
        if values.shape != mask.shape:
            raise MaskViolation(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(values.shape)}")
        leaked = int((values[~mask.to(values.device)] != 0).sum())
        if leaked:
            bad.append(f"{name} ({leaked} non-zero pruned weights)")
    if bad:
        raise MaskViolation("sparsity drifted: " + "; ".join(bad))


def save_masks(masks: Masks, folder: str | Path) -> Path:
    path = Path(folder) / MASKS_FILE
    save_file({name: mask.to(torch.uint8).contiguous() for name, mask in masks.items()}, str(path))
    return path


def load_masks(folder: str | Path) -> Masks:
    return {name: t.to(torch.bool) for name, t in load_file(str(Path(folder) / MASKS_FILE)).items()}
