"""First-order Taylor importance of structural units: |w * dL/dw| summed per kv group or MLP channel.

Only the scored layers' weights get gradients, so the cost is one forward and backward pass
per window with the rest of the model frozen.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from raysparse.errors import ConfigError
from raysparse.models.adapters import ModelAdapter
from raysparse.models.layer_inputs import _layer_output, _move_pre_layer_modules, capture_layer_inputs
from raysparse.models.offload import fetch_layer, release_layer
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


def _watched_modules(adapter: ModelAdapter, layer_indices: Sequence[int]) -> dict[int, dict[str, nn.Module]]:
    layers = adapter.decoder_layers()
    watched: dict[int, dict[str, nn.Module]] = {}
    for index in layer_indices:
        layer = layers[index]
        names = [s.module for spec in (adapter.attention_units(layer), adapter.mlp_units(layer)) for s in spec.slices]
        watched[index] = {name: layer.get_submodule(name) for name in names}
    return watched


def _layer_scores(adapter: ModelAdapter, index: int, modules: dict[str, nn.Module]) -> LayerUnitScores:
    """|w * dL/dw| of one layer's watched weights, summed per unit (their .grad must be filled)."""
    layer = adapter.decoder_layers()[index]
    per_element = {}
    for name, module in modules.items():
        product = (module.weight.data.float() * module.weight.grad.float()).abs()
        per_element[name] = product.t() if adapter.is_transposed(module) else product
    return LayerUnitScores(layer=index, attention=unit_scores(adapter.attention_units(layer), per_element).tolist(),
                           mlp=unit_scores(adapter.mlp_units(layer), per_element).tolist())


@contextlib.contextmanager
def _only_watched_weights_train(model: nn.Module, watched: dict[int, dict[str, nn.Module]]):
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
        yield
    finally:
        for param, flag in previous.items():
            param.grad = None
            param.requires_grad_(flag)
        model.train(was_training)


def _check_loss(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise ConfigError("the loss is not finite on the Taylor importance data: check the model and data")


def taylor_scores(adapter: ModelAdapter, windows: torch.Tensor, layer_indices: Sequence[int],
                  device: torch.device, batch_size: int = 4) -> list[LayerUnitScores]:
    """|w * dL/dw| summed per unit, gradients of the mean loss over `windows`.

    Only the weights of the scored layers get gradients, so memory beyond inference is one
    gradient per scored weight (plus activations of one batch).
    """
    model = adapter.model
    watched = _watched_modules(adapter, layer_indices)
    with _only_watched_weights_train(model, watched):
        total = windows.shape[0]
        for start in tqdm(range(0, total, batch_size), desc="taylor importance", leave=False):
            batch = windows[start:start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            _check_loss(loss)
            (loss * batch.shape[0] / total).backward()
        with torch.no_grad():
            return [_layer_scores(adapter, index, modules) for index, modules in watched.items()]


def taylor_scores_layerwise(adapter: ModelAdapter, windows: torch.Tensor, layer_indices: Sequence[int],
                            device: torch.device, batch_size: int = 4) -> list[LayerUnitScores]:
    """The same scores with one decoder layer on the device at a time (`--offload`).

    A whole-model backward keeps every layer's weights on the device, so instead: a forward
    walk keeps each layer's *input* (on the host), the final norm and LM head turn the last
    hidden states into the loss and its gradient, and a backward walk fetches each layer,
    recomputes it from its kept input and back-propagates the incoming gradient through it
    (its watched weights collect dL/dw, its input's gradient goes on down). Each layer's
    activations are recomputed once, as with activation checkpointing; the extra memory is
    one hidden-state tensor per layer per window on the host. Walks stop at the lowest
    scored layer.
    """
    model = adapter.model
    layers = adapter.decoder_layers()
    watched = _watched_modules(adapter, layer_indices)
    total = windows.shape[0]
    with _only_watched_weights_train(model, watched):
        with torch.no_grad():
            chunks = capture_layer_inputs(adapter, windows, device, batch_size)
            if next(model.parameters()).device != device:  # host-resident: back into their storage
                _move_pre_layer_modules(adapter, torch.device("cpu"))
            hidden = [chunk.hidden for chunk in chunks]
            kept: list[list[torch.Tensor]] = []
            lowest = min(layer_indices)
            for index, layer in enumerate(tqdm(layers, desc="taylor importance (forward walk)", leave=False)):
                fetch_layer(layer, device)
                kept.append([h.to("cpu") for h in hidden] if index >= lowest else [])  # the backward walk stops there
                hidden = [_layer_output(layer(h, *c.args, **c.kwargs)) for h, c in zip(hidden, chunks)]
                release_layer(layer)
        grads = []
        post, head = adapter.post_layer_modules(), model.get_output_embeddings()
        for module in (*post, head):
            fetch_layer(module, device)
        try:
            for h, start in zip(hidden, range(0, total, batch_size)):
                h = h.detach().requires_grad_(True)
                x = h
                for module in post:
                    x = module(x)
                logits = head(x).float()
                batch = windows[start:start + batch_size].to(device)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1))
                _check_loss(loss)
                (loss * batch.shape[0] / total).backward()
                grads.append(h.grad)
        finally:
            for module in (*post, head):
                release_layer(module)
        results = {}
        for index in tqdm(range(len(layers) - 1, lowest - 1, -1), desc="taylor importance (backward walk)",
                          leave=False):
            layer = layers[index]
            fetch_layer(layer, device)
            below = []
            for h_in, g, chunk in zip(kept[index], grads, chunks):
                h = h_in.to(device).requires_grad_(True)
                _layer_output(layer(h, *chunk.args, **chunk.kwargs)).backward(g)
                below.append(h.grad)
            if index in watched:
                with torch.no_grad():
                    results[index] = _layer_scores(adapter, index, watched[index])
            for module in watched.get(index, {}).values():
                module.weight.grad = None  # on the device: dropped before the layer goes back
            release_layer(layer)
            grads, kept[index] = below, []
        return [results[index] for index in watched]


def timed_taylor_scores(adapter: ModelAdapter, windows: torch.Tensor, layer_indices: Sequence[int],
                        device: torch.device, batch_size: int, layerwise: bool = False) -> dict[str, Any]:
    """Taylor scores as plain data (cacheable across a search's trials) with their cost."""
    started = time.perf_counter()
    score = taylor_scores_layerwise if layerwise else taylor_scores
    scores = score(adapter, windows, layer_indices, device, batch_size)
    return {"scores": [asdict(s) for s in scores], "seconds": time.perf_counter() - started}
