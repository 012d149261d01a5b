"""Run a model one decoder layer at a time on calibration data, for Wanda and SparseGPT.

Both methods need the inputs each linear sublayer sees. Following the papers, layer i is
fed the outputs of the *already pruned* layers before it, so pruning errors do not
compound unseen. Only one layer's activations (inputs and outputs of the calibration set)
are held at a time, and a layer is moved to the accelerator only while it is processed, so
a model larger than the GPU can still be pruned.

Two calibration modes. "two" (the reference, default): a layer is run once to collect
every sublayer's statistics from the dense layer, pruned, then run again for its pruned
outputs: two passes per layer. "one" (opt-in, "true sequential"): the whole calibration set
goes through a layer in one call, and each linear sublayer is pruned in a forward pre-hook
just before it runs, from the inputs it is about to see, which already come from the pruned
sublayers before it; the call's output is the pruned layer's output, so one pass per layer.
The cost of "one" is memory: one layer's intermediate activations for every calibration
window at once (the statistics are still collected in slices of `batch_size` windows).
Neither mode runs the LM head: calibration stops at the decoder stack.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from raysparse.config.trial import CALIBRATION_PASSES
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


class SharedInputStats:
    """One statistics collector per distinct input tensor of a layer call.

    Sublayers fed the very same tensor (q/k/v read one normed hidden state, gate/up another)
    share one collector, so SparseGPT's X X^T (and its inverse Cholesky factor) or Wanda's
    column norms are accumulated once instead of per sublayer. Sharing is decided on the
    first call by object identity (the tensors of a call are held until the next, so an id
    is never reused) and must hold for every later call. `split` feeds a collector in slices
    of that many windows (the one-pass mode sees the whole calibration set at once).
    """

    def __init__(self, method: LayerwiseMethod, linears: dict[str, nn.Module], split: int | None = None):
        self.method, self.linears, self.split = method, linears, split
        self.owner: dict[str, str] = {}
        self.collectors: dict[str, StatsCollector] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []

    def new_call(self) -> None:
        self._seen = []

    def add(self, name: str, inputs: torch.Tensor) -> None:
        fed_as = next((owner for tensor, owner in self._seen if tensor is inputs), name)
        if name not in self.owner:
            self.owner[name] = fed_as
            if fed_as == name:
                self.collectors[name] = self.method.make_collector(self.linears[name])
        elif self.owner[name] != fed_as:
            raise RuntimeError(f"sublayer {name} was fed another tensor than on the first calibration batch")
        if fed_as == name:
            for piece in inputs.detach().split(self.split) if self.split else (inputs.detach(),):
                self.collectors[name].add_batch(piece)
            self._seen.append((inputs, name))

    def stats(self, name: str) -> StatsCollector:
        return self.collectors[self.owner[name]]

    def collect(self, layer: nn.Module, chunks: list) -> list[torch.Tensor]:
        """Run `layer` on every chunk with each sublayer's inputs going to its collector; return
        the layer's outputs."""
        hooks = [module.register_forward_hook(lambda _m, inputs, _out, name=name: self.add(name, inputs[0]))
                 for name, module in self.linears.items()]
        outputs = []
        try:
            for chunk in chunks:
                self.new_call()
                outputs.append(_layer_output(layer(chunk.hidden, *chunk.args, **chunk.kwargs)))
        finally:
            self.new_call()
            for hook in hooks:
                hook.remove()
        return outputs


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
    passes: str = "two",
) -> Masks:
    """Prune every decoder layer in order and return keep-masks keyed by parameter name.

    `passes`: "two" (reference: statistics from the dense layer, then a second pass for the
    pruned outputs) or "one" (true sequential, one pass per layer; see the module docstring).
    """
    if passes not in CALIBRATION_PASSES:
        raise ValueError(f"passes must be one of {CALIBRATION_PASSES}, got {passes!r}")
    model = adapter.model
    offload = next(model.parameters()).device != device
    was_training = model.training
    model.eval()
    chunks = capture_layer_inputs(adapter, calib, device, batch_size if passes == "two" else calib.shape[0])
    masks: Masks = {}
    layers = adapter.decoder_layers()
    try:
        for index in tqdm(range(len(layers)), desc=desc, leave=False):
            layer = layers[index]
            if offload:
                fetch_layer(layer, device)
            linears = {n: m for n, m in adapter.prunable_linears(layer).items()
                       if should_prune(f"{adapter.layers_path}.{index}.{n}")}
            if layer_patterns is not None:
                method.pattern = layer_patterns[index]  # this layer's own ratio
            if passes == "one":
                masks.update(_prune_layer_in_one_pass(adapter, method, layer, index, linears, chunks, batch_size))
                if offload:
                    release_layer(layer)  # back into its host (or disk-mapped) storage
                continue
            shared = SharedInputStats(method, linears)
            shared.collect(layer, chunks)
            for name, module in linears.items():
                remove = method.prune_module(adapter, module, shared.stats(name))
                masks[f"{adapter.layers_path}.{index}.{name}.weight"] = adapter.to_param_layout(module, ~remove).cpu()
            for chunk in chunks:  # the pruned layer's output feeds the next layer
                chunk.hidden = _layer_output(layer(chunk.hidden, *chunk.args, **chunk.kwargs))
            if offload:
                release_layer(layer)  # back into its host (or disk-mapped) storage
    finally:
        model.train(was_training)
        if offload:
            _move_pre_layer_modules(adapter, torch.device("cpu"))
    return masks


def _prune_layer_in_one_pass(adapter: ModelAdapter, method: LayerwiseMethod, layer: nn.Module, index: int,
                             linears: dict[str, nn.Module], chunks: list, batch_size: int) -> Masks:
    """Run `layer` once on the whole calibration set, pruning each sublayer just before it runs.

    The pre-hook sees exactly the inputs the sublayer is about to compute on (outputs of the
    sublayers pruned before it), collects them in slices of `batch_size` windows, prunes the
    weights in place, and lets the call go on with the pruned weights; the layer's output then
    replaces the hidden states that feed the next layer.
    """
    masks: Masks = {}
    shared = SharedInputStats(method, linears, split=batch_size)  # q/k/v share one collector

    def prune_before_use(name: str, module: nn.Module, inputs: tuple) -> None:
        if f"{adapter.layers_path}.{index}.{name}.weight" in masks:
            return  # a sublayer called twice in one forward is pruned once, on its first inputs
        shared.add(name, inputs[0])
        remove = method.prune_module(adapter, module, shared.stats(name))
        masks[f"{adapter.layers_path}.{index}.{name}.weight"] = adapter.to_param_layout(module, ~remove).cpu()

    hooks = [module.register_forward_pre_hook(lambda m, inputs, name=name: prune_before_use(name, m, inputs))
             for name, module in linears.items()]
    try:
        for chunk in chunks:
            shared.new_call()
            chunk.hidden = _layer_output(layer(chunk.hidden, *chunk.args, **chunk.kwargs))
    finally:
        shared.new_call()
        for hook in hooks:
            hook.remove()
    missing = [name for name in linears if f"{adapter.layers_path}.{index}.{name}.weight" not in masks]
    if missing:
        raise RuntimeError(f"decoder layer {index}: the sublayers {missing} never ran, so they were not pruned")
    return masks
