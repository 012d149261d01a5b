"""The layer database: every decoder layer pruned once at every level of the grid.

Each entry is computed on the *dense* model's inputs to its layer (not the inputs after the
earlier layers were pruned, as a one-shot prune does), so an entry does not depend on what
the other layers hold and any profile can be assembled from entries by copying them in:
assembling costs loading, not pruning (EvoPress's database). Calibration statistics are
collected once per layer and reused for every level. One cache entry per layer (all its
levels) goes through the statistics cache, so a second search, another process or another
node of a search reads it instead of pruning again. Wanda entries are keep-masks (the
weight is the dense weight under the mask); SparseGPT entries are the updated weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from raysparse.errors import ConfigError
from raysparse.models.adapters import ModelAdapter
from raysparse.models.layer_inputs import _Chunk, _layer_output, capture_layer_inputs
from raysparse.prune.layerwise import SharedInputStats
from raysparse.prune.sparsegpt import SparseGPTMethod
from raysparse.prune.wanda import WandaMethod
from raysparse.sparsity.pattern import SparsityPattern

logger = logging.getLogger(__name__)

METHODS = ("wanda", "sparsegpt")

LayerEntry = dict[str, Any]  # {"levels": [...], "kind": "mask" | "weight", "entries": [{name: tensor}, ...]}


def make_method(method: str, percdamp: float = 0.01, blocksize: int = 128):
    if method == "wanda":
        return WandaMethod(SparsityPattern(ratio=0.5))
    if method == "sparsegpt":
        return SparseGPTMethod(SparsityPattern(ratio=0.5), percdamp, blocksize)
    raise ConfigError(f"a profile search prunes with {' or '.join(METHODS)}, not {method}: its database holds "
                      "calibrated layers")


@torch.no_grad()
def prune_layer_levels(adapter: ModelAdapter, index: int, layer: torch.nn.Module, method: Any,
                       chunks: list[_Chunk], levels: Sequence[float]) -> tuple[LayerEntry, list[torch.Tensor]]:
    """Prune `layer` at every level from one collection of its (dense) inputs; the layer is left dense.

    Returns the entry and the layer's dense outputs (the next layer's inputs).
    """
    linears = adapter.prunable_linears(layer)
    shared = SharedInputStats(method, linears)  # one collector (and SparseGPT factorisation) per input
    outputs = shared.collect(layer, chunks)
    dense = {name: module.weight.detach().clone() for name, module in linears.items()}
    kind = "weight" if isinstance(method, SparseGPTMethod) else "mask"
    entries: list[dict[str, torch.Tensor]] = []
    try:
        for level in levels:
            method.pattern = SparsityPattern(ratio=float(level))
            entry = {}
            for name, module in linears.items():
                module.weight.data.copy_(dense[name])
                remove = method.prune_module(adapter, module, shared.stats(name))
                entry[name] = (module.weight.detach().cpu().clone() if kind == "weight"
                               else adapter.to_param_layout(module, ~remove).cpu())
            entries.append(entry)
    finally:
        for name, module in linears.items():
            module.weight.data.copy_(dense[name])
    return {"levels": [float(v) for v in levels], "kind": kind, "entries": entries}, outputs


@dataclass
class LayerDatabase:
    """Entries per decoder layer, plus what is needed to assemble a model from them."""

    layers: list[LayerEntry]
    levels: list[float]
    build_s: float = 0.0
    outcomes: list[str] = field(default_factory=list)  # "computed" / "hit" per layer


@torch.no_grad()
def build_database(adapter: ModelAdapter, method_name: str, calib: torch.Tensor, levels: Sequence[float],
                   device: torch.device, batch_size: int = 8, percdamp: float = 0.01, blocksize: int = 128,
                   get_or_compute: Callable[[int, Callable[[], LayerEntry]], LayerEntry] | None = None,
                   ) -> list[LayerEntry]:
    """Every layer's entry, through `get_or_compute(layer_index, compute)` (the statistics cache).

    The dense layer-by-layer pass runs lazily: when every entry is cached it never runs; a
    missing entry advances the pass to its layer first.
    """
    method = make_method(method_name, percdamp, blocksize)
    model = adapter.model
    was_training = model.training
    model.eval()
    layers = adapter.decoder_layers()
    state: dict[str, Any] = {"chunks": None, "at": 0}

    def advance_to(index: int) -> list[_Chunk]:
        if state["chunks"] is None:
            state["chunks"] = capture_layer_inputs(adapter, calib, device, batch_size)
        chunks = state["chunks"]
        while state["at"] < index:
            layer = layers[state["at"]]
            for c in chunks:
                c.hidden = _layer_output(layer(c.hidden, *c.args, **c.kwargs))
            state["at"] += 1
        return chunks

    def compute(index: int) -> LayerEntry:
        chunks = advance_to(index)
        entry, outputs = prune_layer_levels(adapter, index, layers[index], method, chunks, levels)
        for c, out in zip(chunks, outputs):
            c.hidden = out
        state["at"] = index + 1
        return entry

    result = []
    try:
        for index in tqdm(range(len(layers)), desc=f"layer database ({method_name}, {len(levels)} levels)",
                          leave=False):
            make = (lambda i=index: compute(i))
            result.append(make() if get_or_compute is None else get_or_compute(index, make))
    finally:
        model.train(was_training)
    return result


class ProfileAssembler:
    """Puts a profile's entries into a model, copying only layers whose level changed."""

    def __init__(self, adapter: ModelAdapter, database: Sequence[LayerEntry]):
        self.adapter = adapter
        self.database = database
        self.layers = adapter.decoder_layers()
        if len(database) != len(self.layers):
            raise ConfigError(f"the layer database has {len(database)} layers, the model {len(self.layers)}")
        self.dense = [{name: m.weight.detach().clone() for name, m in adapter.prunable_linears(layer).items()}
                      for layer in self.layers]
        self.current: list[int | None] = [None] * len(self.layers)  # None = dense

    @torch.no_grad()
    def restore_dense(self) -> None:
        for index, layer in enumerate(self.layers):
            for name, module in self.adapter.prunable_linears(layer).items():
                module.weight.data.copy_(self.dense[index][name])
        self.current = [None] * len(self.layers)

    @torch.no_grad()
    def apply(self, profile: Sequence[int]) -> None:
        for index, level in enumerate(profile):
            if self.current[index] == level:
                continue
            entry = self.database[index]
            linears = self.adapter.prunable_linears(self.layers[index])
            for name, stored in entry["entries"][level].items():
                weight = linears[name].weight
                if entry["kind"] == "weight":
                    weight.data.copy_(stored.to(weight.device, weight.dtype))
                else:
                    weight.data.copy_(self.dense[index][name] * stored.to(weight.device))
            self.current[index] = int(level)
