"""Capture the inputs of the first decoder layer for calibration windows, in chunks.

Layer-by-layer pruning and layer importance both walk the decoder layers with their real
inputs; this module is where those inputs come from, so neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysparse.models.adapters import ModelAdapter
from raysparse.models.offload import fetch_layer, release_layer


class _StopForward(Exception):
    pass


@dataclass
class _Chunk:
    """One calibration mini-batch as layer 0 receives it: hidden states + the call's other args."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


class _InputCatcher(nn.Module):
    """Stands in for decoder layer 0 to record its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, store: list[_Chunk]):
        super().__init__()
        self.layer = layer
        self.store = store

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.store.append(_Chunk(hidden.detach(), rest, kwargs))
        raise _StopForward


def _move_pre_layer_modules(adapter: ModelAdapter, device: torch.device) -> None:
    """To the device for a layer walk; back (into their host or disk-mapped storage) after it."""
    for module in adapter.pre_layer_modules():
        if device.type == "cpu":
            release_layer(module)
        else:
            fetch_layer(module, device)


@torch.no_grad()
def capture_layer_inputs(
    adapter: ModelAdapter, calib: torch.Tensor, device: torch.device, batch_size: int
) -> list[_Chunk]:
    """Hidden states entering decoder layer 0 for every calibration window, in chunks."""
    layers = adapter.decoder_layers()
    store: list[_Chunk] = []
    original = layers[0]
    _move_pre_layer_modules(adapter, device)
    layers[0] = _InputCatcher(original, store)
    try:
        for start in range(0, calib.shape[0], batch_size):
            try:
                adapter.model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = original
    return store


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output
