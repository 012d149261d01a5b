"""The layer database: every decoder layer pruned once at every level of the grid.

By default each entry is computed on the *dense* model's inputs to its layer (not the inputs
after the earlier layers were pruned, as a one-shot prune does), so an entry does not depend
on what the other layers hold and any profile can be assembled from entries by copying them
in: assembling costs loading, not pruning (EvoPress's database). An *anchored* database
(`inputs_from`) instead feeds each layer the outputs of the earlier layers pruned at the
anchor profile, as the sequential prune of that profile does: the assembled anchor is then
exactly its one-shot prune, and profiles near it are scored close to how launch/prune.py
will prune them (SparseGPT's weight updates compensate for the inputs they were calibrated
on, so at high sparsity dense-calibrated entries rank profiles differently). Calibration statistics are
collected once per layer and reused for every level. One cache entry per layer (all its
levels) goes through the statistics cache, so a second search, another process or another
node of a search reads it instead of pruning again.

An entry is stored compactly, because the database is read whole by every reload and every
Ray actor: a keep-mask packed eight weights to a byte, and for SparseGPT (which updates the
weights it keeps) only the kept values, so a layer at 80% costs a fifth of its dense size plus
a thirty-second for the mask instead of a full copy per level. Wanda keeps the dense values,
so its entries are the packed mask alone.
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

# {"levels": [...], "kind": "mask" | "weight", "entries": [{name: {"keep": packed bits, "values"?: kept}}, ...]}
LayerEntry = dict[str, Any]

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask as uint8, eight elements per byte (row-major, zero-padded at the end)."""
    flat = keep.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """`pack_mask`'s inverse for a mask of `shape`."""
    numel = 1
    for n in shape:
        numel *= int(n)
    bits = packed.reshape(-1, 1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:numel].view(tuple(shape))


def compact_entry(weight: torch.Tensor, keep: torch.Tensor, with_values: bool) -> dict[str, torch.Tensor]:
    """One pruned matrix as its packed keep-mask (and its kept values when they differ from dense)."""
    entry = {"keep": pack_mask(keep.cpu())}
    if with_values:
        entry["values"] = weight.detach()[keep].cpu().clone()
    return entry


@torch.no_grad()
def write_entry(weight: torch.Tensor, dense: torch.Tensor, stored: dict[str, torch.Tensor]) -> None:
    """Put a compact entry into `weight`: the kept values (or the dense ones) under the mask, zeros elsewhere."""
    keep = unpack_mask(stored["keep"], weight.shape).to(weight.device)
    if "values" in stored:
        weight.zero_()
        weight.masked_scatter_(keep, stored["values"].to(weight.device, weight.dtype))
    else:
        torch.mul(dense, keep, out=weight)


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
                entry[name] = compact_entry(module.weight, adapter.to_param_layout(module, ~remove),
                                            with_values=kind == "weight")
            entries.append(entry)
    finally:
        for name, module in linears.items():
            module.weight.data.copy_(dense[name])
    return {"levels": [float(v) for v in levels], "kind": kind, "entries": entries}, outputs


@torch.no_grad()
def _pruned_outputs(adapter: ModelAdapter, layer: torch.nn.Module, stored: dict[str, Any],
                    chunks: list[_Chunk]) -> list[torch.Tensor]:
    """The layer's outputs with one entry written in (the layer is left dense)."""
    linears = adapter.prunable_linears(layer)
    dense = {name: module.weight.detach().clone() for name, module in linears.items()}
    try:
        for name, module in linears.items():
            write_entry(module.weight.data, dense[name], stored[name])
        return [_layer_output(layer(c.hidden, *c.args, **c.kwargs)) for c in chunks]
    finally:
        for name, module in linears.items():
            module.weight.data.copy_(dense[name])


@dataclass
class LayerDatabase:
    """Entries per decoder layer, plus what is needed to assemble a model from them."""

    layers: list[LayerEntry]
    levels: list[float]
    build_s: float = 0.0
    outcomes: list[str] = field(default_factory=list)  # "computed" / "hit" per layer


@torch.no_grad()
def build_database(adapter: ModelAdapter, method_name: str, calib: torch.Tensor,
                   levels: Sequence[float] | Sequence[Sequence[float]], device: torch.device, batch_size: int = 8,
                   percdamp: float = 0.01, blocksize: int = 128,
                   get_or_compute: Callable[[int, Callable[[], LayerEntry]], LayerEntry] | None = None,
                   inputs_from: Sequence[int] | None = None, firsts: Sequence[int] | None = None,
                   ) -> list[LayerEntry]:
    """Every layer's entry, through `get_or_compute(layer_index, compute)` (the statistics cache).

    `levels`: one grid for every layer, or one list per layer (an anchored grid). `inputs_from`:
    per layer, the position in its levels whose entry produces the next layer's inputs (an
    anchored database); None feeds dense outputs. `firsts`: per layer, the grid index of its
    first level (recorded as the entry's "first", so profiles index the common grid).
    The layer-by-layer pass runs lazily: when every entry is cached it never runs; a missing
    entry advances the pass to its layer first.
    """
    method = make_method(method_name, percdamp, blocksize)
    model = adapter.model
    was_training = model.training
    model.eval()
    layers = adapter.decoder_layers()
    per_layer = ([list(v) for v in levels] if levels and isinstance(levels[0], (list, tuple))
                 else [list(levels)] * len(layers))
    if len(per_layer) != len(layers):
        raise ConfigError(f"{len(per_layer)} level lists for a model of {len(layers)} decoder layers")
    state: dict[str, Any] = {"chunks": None, "at": 0}
    result: list[LayerEntry] = []

    def forward(index: int, chunks: list[_Chunk], entry: LayerEntry,
                dense_outputs: list[torch.Tensor] | None = None) -> None:
        """Move the calibration activations past layer `index` (dense, or at its anchor entry)."""
        if inputs_from is not None:
            outputs = _pruned_outputs(adapter, layers[index], entry["entries"][inputs_from[index]], chunks)
        elif dense_outputs is not None:
            outputs = dense_outputs
        else:
            outputs = [_layer_output(layers[index](c.hidden, *c.args, **c.kwargs)) for c in chunks]
        for c, out in zip(chunks, outputs):
            c.hidden = out
        state["at"] = index + 1

    def advance_to(index: int) -> list[_Chunk]:
        if state["chunks"] is None:
            state["chunks"] = capture_layer_inputs(adapter, calib, device, batch_size)
        while state["at"] < index:
            forward(state["at"], state["chunks"], result[state["at"]])
        return state["chunks"]

    def compute(index: int) -> LayerEntry:
        chunks = advance_to(index)
        entry, outputs = prune_layer_levels(adapter, index, layers[index], method, chunks, per_layer[index])
        entry["first"] = int(firsts[index]) if firsts is not None else 0
        forward(index, chunks, entry, outputs)
        return entry

    try:
        for index in tqdm(range(len(layers)), desc=f"layer database ({method_name}, {len(per_layer[0])} levels)",
                          leave=False):
            make = (lambda i=index: compute(i))
            result.append(make() if get_or_compute is None else get_or_compute(index, make))
    finally:
        model.train(was_training)
    return result


class DenseWeights:
    """A copy of every prunable weight, per decoder layer, to put the dense model back."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.layers = adapter.decoder_layers()
        self.weights = [{name: m.weight.detach().clone() for name, m in adapter.prunable_linears(layer).items()}
                        for layer in self.layers]

    @torch.no_grad()
    def restore(self) -> None:
        for index, layer in enumerate(self.layers):
            for name, module in self.adapter.prunable_linears(layer).items():
                module.weight.data.copy_(self.weights[index][name])


class ProfileAssembler:
    """Puts a profile's entries into a model, copying only layers whose level changed."""

    def __init__(self, adapter: ModelAdapter, database: Sequence[LayerEntry], dense: DenseWeights | None = None):
        self.adapter = adapter
        self.database = database
        self.layers = adapter.decoder_layers()
        if len(database) != len(self.layers):
            raise ConfigError(f"the layer database has {len(database)} layers, the model {len(self.layers)}")
        self.dense_weights = dense or DenseWeights(adapter)
        self.dense = self.dense_weights.weights
        self.current: list[int | None] = [None] * len(self.layers)  # None = dense

    def restore_dense(self) -> None:
        self.dense_weights.restore()
        self.current = [None] * len(self.layers)

    @torch.no_grad()
    def apply(self, profile: Sequence[int]) -> None:
        for index, level in enumerate(profile):
            if self.current[index] == level:
                continue
            entry = self.database[index]
            linears = self.adapter.prunable_linears(self.layers[index])
            for name, stored in entry["entries"][level - entry.get("first", 0)].items():
                write_entry(linears[name].weight.data, self.dense[index][name], stored)
            self.current[index] = int(level)
