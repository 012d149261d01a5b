"""Masked dense fine-tuning: train every surviving weight, never a pruned one.

Gradients of pruned positions are zeroed before each optimizer step and the pruned
weights are re-zeroed after it, so neither AdamW's moments nor weight decay can move a
weight off zero: sparsity is exactly the same after training as before.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor

from raysparse.recover.loop import TrainResult, TrainSettings, fit
from raysparse.sparsity.masks import Masks


def mask_hooks(model: nn.Module, masks: Masks) -> tuple[Callable[[], None], Callable[[], None]]:
    """(after_backward, after_step) callbacks that keep `masks` exact on `model`.

    Masks are moved once to each parameter's device and, for FSDP2 DTensor parameters,
    sharded with the same mesh and placements as the parameter they guard.
    """
    params = dict(model.named_parameters())
    pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
    for name, mask in masks.items():
        param = params[_find_param_name(params, name)]
        local_mask = mask.to(device=param.device, dtype=param.dtype)
        if hasattr(param, "device_mesh") and hasattr(param, "placements"):
            local_mask = distribute_tensor(local_mask, param.device_mesh, param.placements)
        pairs.append((param, local_mask))

    @torch.no_grad()
    def after_backward() -> None:
        for param, mask in pairs:
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def after_step() -> None:
        for param, mask in pairs:
            param.mul_(mask)

    return after_backward, after_step


def _find_param_name(params: dict[str, nn.Parameter], name: str) -> str:
    """Masks are keyed by the plain model's names; wrappers (peft, FSDP) may add prefixes."""
    if name in params:
        return name
    matches = [candidate for candidate in params if candidate.endswith("." + name) or
               candidate.replace(".base_layer", "").endswith(name)]
    if len(matches) != 1:
        raise KeyError(f"cannot find the parameter for mask {name}")
    return matches[0]


def train_masked(
    model: nn.Module,
    masks: Masks,
    windows: torch.Tensor,
    settings: TrainSettings,
    evaluate: Callable[[], float] | None,
    **fit_kwargs,
) -> TrainResult:
    """Fine-tune all parameters of a pruned model while keeping its sparsity pattern."""
    after_backward, after_step = mask_hooks(model, masks)
    for param in model.parameters():
        param.requires_grad_(True)
    return fit(model, [p for p in model.parameters()], windows, settings, evaluate,
               after_backward=after_backward, after_step=after_step, desc="masked fine-tuning", **fit_kwargs)
