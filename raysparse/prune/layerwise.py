"""Run a model one decoder layer at a time on calibration data, for Wanda and SparseGPT.

Both methods need the inputs each linear sublayer sees. Following the papers, layer i is
fed the outputs of the *already pruned* layers before it, so pruning errors do not
compound unseen. Only one layer's activations (inputs and outputs of the calibration set)
are held at a time, and a layer is moved to the accelerator only while it is processed, so
a model larger than the GPU can still be pruned.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from raysparse.models.adapters import ModelAdapter
from raysparse.models.layer_inputs import _layer_output, _move_pre_layer_modules, capture_layer_inputs
from raysparse.models.offload import fetch_layer, release_layer
from raysparse.sparsity.masks import Masks

logger = logging.getLogger(__name__)


class StatsCollector(Protocol):
    """Accumulates what a pruner needs from the inputs of one linear sublayer."""

    def add_batch(self, inputs: torch.Tensor) -> None: ...


class LayerwiseMethod(Protocol):
    """A calibration-based pruner: makes collectors and turns their statistics into masks."""

    def make_collector(self, module: nn.Module) -> StatsCollector: ...

    def prune_module(self, adapter: ModelAdapter, module: nn.Module, stats: StatsCollector) -> torch.Tensor:
        """Prune `module` in place; return its remove-mask in (out, in) layout."""
        ...


@torch.no_grad()
def prune_layerwise(
    adapter: ModelAdapter,
    method: LayerwiseMethod,
    calib: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
    desc: str = "pruning layers",
    should_prune: Callable[[str], bool] = lambda name: True,
    layer_patterns: list | None = None,
) -> Masks:
    """Prune every decoder layer in order and return keep-masks keyed by parameter name."""
    model = adapter.model
    offload = next(model.parameters()).device != device
    was_training = model.training
    model.eval()
    chunks = capture_layer_inputs(adapter, calib, device, batch_size)
    masks: Masks = {}
    layers = adapter.decoder_layers()
    try:
        for index in tqdm(range(len(layers)), desc=desc, leave=False):
            layer = layers[index]
            if offload:
                fetch_layer(layer, device)
            linears = {n: m for n, m in adapter.prunable_linears(layer).items()
                       if should_prune(f"{adapter.layers_path}.{index}.{n}")}
            collectors = {name: method.make_collector(module) for name, module in linears.items()}
            hooks = [
                module.register_forward_hook(
                    lambda _m, inputs, _out, c=collectors[name]: c.add_batch(inputs[0].detach())
                )
                for name, module in linears.items()
            ]
            try:
                for chunk in chunks:
                    layer(chunk.hidden, *chunk.args, **chunk.kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
            if layer_patterns is not None:
                method.pattern = layer_patterns[index]  # this layer's own ratio
            for name, module in linears.items():
                remove = method.prune_module(adapter, module, collectors[name])
                masks[f"{adapter.layers_path}.{index}.{name}.weight"] = adapter.to_param_layout(module, ~remove).cpu()
            del collectors
            for chunk in chunks:  # the pruned layer's output feeds the next layer
                chunk.hidden = _layer_output(layer(chunk.hidden, *chunk.args, **chunk.kwargs))
            if offload:
                release_layer(layer)  # back into its host (or disk-mapped) storage
    finally:
        model.train(was_training)
        if offload:
            _move_pre_layer_modules(adapter, torch.device("cpu"))
    return masks
