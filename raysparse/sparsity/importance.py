"""Layer importance of a dense causal LM: how much each decoder layer matters.

Unbalanced pruning (WORKFLOWS.md section 4) prunes important layers less. Two measures:

- ``removal``: skip one decoder layer at a time (its residual stream passes through
  unchanged) and measure how much the mean next-token loss on the calibration windows
  rises. Faithful to what pruning a layer costs, but needs one full forward pass of the
  calibration set per layer.
- ``activation``: one layer-by-layer pass; a layer's score is how much it changes its
  input, ``mean over tokens of 1 - cos(input, output)``. Cheap (one pass), but only a
  proxy: a layer can change the residual stream little and still matter.
- ``owl``: outlier-weighted layerwise sparsity (OWL, Yin et al. 2024). One layer-by-layer
  pass of the dense model; a layer's score is its outlier ratio, the fraction of its Wanda
  scores ``|W_ij| * ||X_j||_2`` (all prunable linears of the layer together) above ``M``
  times the layer's mean score. Layers with many outliers are pruned less (``inverse``).

Both depend only on the dense model, the data, the sample count, seqlen and seed, so the
result is saved as JSON (``layer_importance.json``) and reused across trials; `load`
refuses a file written for another model so a stale cache never silently misallocates.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from raysparse.errors import ConfigError
from raysparse.models.adapters import ModelAdapter
from raysparse.models.layer_inputs import _layer_output, capture_layer_inputs

logger = logging.getLogger(__name__)

IMPORTANCE_METHODS: tuple[str, ...] = ("removal", "activation", "owl")

DEFAULT_OWL_M = 5.0


@dataclass
class LayerImportance:
    """Per-layer importance scores plus the protocol that produced them (for reuse checks)."""

    scores: list[float]
    method: str
    model: str
    num_layers: int
    samples: int
    seqlen: int
    seed: int
    data: str
    seconds: float = 0.0
    owl_m: float | None = None  # the outlier threshold M of method "owl"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerImportance":
        """Build from a dict, checking types and consistency (a JSON file may be hand-edited)."""
        if not isinstance(data, dict):
            raise ConfigError(f"layer importance must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        required = names - {"seconds", "owl_m"}
        missing = sorted(required - data.keys())
        if missing:
            raise ConfigError(f"layer importance is missing field(s): {', '.join(missing)}")
        try:
            scores = [float(s) for s in data["scores"]]
            result = cls(
                scores=scores,
                method=str(data["method"]),
                model=str(data["model"]),
                num_layers=int(data["num_layers"]),
                samples=int(data["samples"]),
                seqlen=int(data["seqlen"]),
                seed=int(data["seed"]),
                data=str(data["data"]),
                seconds=float(data.get("seconds", 0.0)),
                owl_m=None if data.get("owl_m") is None else float(data["owl_m"]),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"layer importance has a field of the wrong type: {exc}") from None
        if result.method not in IMPORTANCE_METHODS:
            raise ConfigError(
                f"layer importance method '{result.method}' is unknown; expected one of {', '.join(IMPORTANCE_METHODS)}"
            )
        if len(result.scores) != result.num_layers:
            raise ConfigError(
                f"layer importance has {len(result.scores)} scores but num_layers={result.num_layers}"
            )
        if not all(math.isfinite(s) for s in result.scores):
            raise ConfigError("layer importance holds a non-finite score (NaN or inf)")
        return result

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        logger.info("layer importance (%s, %d layers) saved to %s", self.method, self.num_layers, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected_model: str | None = None,
        expected_layers: int | None = None,
    ) -> "LayerImportance":
        """Read a saved file; ConfigError if missing, malformed, or written for another model."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"layer importance file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"layer importance file {path} is not valid JSON: {exc}") from None
        try:
            result = cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if expected_model is not None and result.model != expected_model:
            raise ConfigError(
                f"layer importance file {path} is for model '{result.model}', not '{expected_model}': "
                "recompute it for this model or point at the right file"
            )
        if expected_layers is not None and result.num_layers != expected_layers:
            raise ConfigError(
                f"layer importance file {path} has {result.num_layers} layers but the model has "
                f"{expected_layers}: it was computed for another model"
            )
        return result


class _SkipLayer(nn.Module):
    """Stands in for a decoder layer and returns its input hidden states untouched.

    It returns them in the form the real layer returns its output, because the model's layer
    loop unpacks that form: recent transformers releases return a bare tensor from every
    decoder layer, earlier 5.x releases a tuple for some families (OPT, GPT-2), whose first
    element the loop takes. `tuple_length` (0 = bare tensor) is recorded from the real layer.
    """

    def __init__(self, layer: nn.Module, tuple_length: int = 0):
        super().__init__()
        self.layer = layer  # kept so the module tree (and attributes like layer_idx) stay reachable
        self.tuple_length = tuple_length

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[Any, ...]:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + (None,) * (self.tuple_length - 1) if self.tuple_length else hidden


def _output_forms(layers: nn.ModuleList) -> tuple[list[int], list[Any]]:
    """Hooks that record each layer's output form (tuple length, 0 = tensor) on the next forward."""
    forms = [0] * len(layers)

    def recorder(index: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            forms[index] = len(output) if isinstance(output, (tuple, list)) else 0
        return hook

    return forms, [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_windows(calib_windows: torch.Tensor) -> None:
    if calib_windows.ndim != 2 or calib_windows.shape[0] == 0 or calib_windows.shape[1] < 2:
        raise ConfigError(
            f"calibration windows must be a (n, seqlen) tensor with n >= 1 and seqlen >= 2, "
            f"got shape {tuple(calib_windows.shape)}"
        )


@torch.no_grad()
def mean_next_token_loss(model: nn.Module, calib_windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over every predicted token of every window.

    Computed as a token-weighted sum (not a mean of batch means) so the value does not
    depend on the batch size.
    """
    device = _model_device(model)
    total, count = 0.0, 0
    for start in range(0, calib_windows.shape[0], batch_size):
        inputs = calib_windows[start : start + batch_size].to(device)
        logits = model(input_ids=inputs, use_cache=False).logits[:, :-1, :].float()
        targets = inputs[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total / count


@torch.no_grad()
def removal_importance(
    adapter: ModelAdapter, calib_windows: torch.Tensor, batch_size: int = 8
) -> list[float]:
    """Importance of layer i = loss with layer i skipped - loss of the full model.

    Each layer is swapped for `_SkipLayer` in turn and always restored (even on errors);
    the model's train/eval mode is restored too.
    """
    _check_windows(calib_windows)
    model = adapter.model
    was_training = model.training
    model.eval()
    layers = adapter.decoder_layers()
    scores: list[float] = []
    forms, hooks = _output_forms(layers)
    try:
        try:
            base = mean_next_token_loss(model, calib_windows, batch_size)
        finally:
            for hook in hooks:
                hook.remove()
        logger.info("removal importance: base loss %.5f over %d windows", base, calib_windows.shape[0])
        for index in range(len(layers)):
            original = layers[index]
            layers[index] = _SkipLayer(original, forms[index])
            try:
                loss = mean_next_token_loss(model, calib_windows, batch_size)
            finally:
                layers[index] = original
            scores.append(loss - base)
            logger.debug("layer %d: loss without it %.5f (importance %.5f)", index, loss, loss - base)
    finally:
        model.train(was_training)
    return scores


def _layer_by_layer(adapter: ModelAdapter, calib_windows: torch.Tensor, batch_size: int,
                    score: Callable[[nn.Module, list[Any]], float]) -> list[float]:
    """One pass of the dense model, layer by layer: `score(layer, chunks)` rates a layer from its
    inputs and must leave its outputs in the chunks (the next layer's inputs)."""
    _check_windows(calib_windows)
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        chunks = capture_layer_inputs(adapter, calib_windows, _model_device(model), batch_size)
        scores = []
        for index, layer in enumerate(adapter.decoder_layers()):
            scores.append(score(layer, chunks))
            logger.debug("layer %d: importance %.6f", index, scores[-1])
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def activation_importance(
    adapter: ModelAdapter, calib_windows: torch.Tensor, batch_size: int = 8
) -> list[float]:
    """Importance of layer i = mean over tokens of 1 - cos(layer input, layer output).

    Cheap: one layer-by-layer pass over the calibration set (as the layerwise pruners run),
    but a proxy for what removing the layer costs, not a measurement of it.
    """
    def score(layer: nn.Module, chunks: list[Any]) -> float:
        total, count = 0.0, 0
        for chunk in chunks:
            out = _layer_output(layer(chunk.hidden, *chunk.args, **chunk.kwargs))
            cos = F.cosine_similarity(chunk.hidden.float(), out.float(), dim=-1)
            total += float((1.0 - cos).sum())
            count += cos.numel()
            chunk.hidden = out
        return total / count

    return _layer_by_layer(adapter, calib_windows, batch_size, score)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all `scores` (one layer's Wanda scores, every linear) above m x their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


@torch.no_grad()
def owl_importance(
    adapter: ModelAdapter, calib_windows: torch.Tensor, m: float = DEFAULT_OWL_M, batch_size: int = 8
) -> list[float]:
    """Importance of layer i = its outlier ratio (OWL): share of |W|*||X||_2 above m x the layer mean.

    The inputs are the dense model's (no layer is pruned during the pass), as in the paper.
    """
    if not (math.isfinite(m) and m > 0):
        raise ConfigError(f"owl_m must be > 0 (the paper uses 5-10), got {m}")

    def score(layer: nn.Module, chunks: list[Any]) -> float:
        linears = adapter.prunable_linears(layer)
        # squared input norm per input feature (Wanda's ||X_j||^2), summed over every token
        sq_norms = {name: torch.zeros(adapter.weight_matrix(mod).shape[1], device=mod.weight.device)
                    for name, mod in linears.items()}

        def add(name: str, inputs: tuple) -> None:
            sq_norms[name] += inputs[0].reshape(-1, inputs[0].shape[-1]).float().pow(2).sum(dim=0)

        hooks = [mod.register_forward_hook(lambda _m, inputs, _o, n=name: add(n, inputs))
                 for name, mod in linears.items()]
        try:
            outputs = [_layer_output(layer(chunk.hidden, *chunk.args, **chunk.kwargs)) for chunk in chunks]
        finally:
            for hook in hooks:
                hook.remove()
        for chunk, out in zip(chunks, outputs):
            chunk.hidden = out
        return outlier_ratio([adapter.weight_matrix(mod).abs().float() * sq_norms[name].sqrt().unsqueeze(0)
                              for name, mod in linears.items()], m)

    return _layer_by_layer(adapter, calib_windows, batch_size, score)


def compute_importance(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    method: str,
    model_name: str,
    seed: int,
    data_desc: str,
    batch_size: int = 8,
    owl_m: float = DEFAULT_OWL_M,
) -> LayerImportance:
    """Run the chosen method on (n, seqlen) calibration windows and record its protocol."""
    if method not in IMPORTANCE_METHODS:
        raise ConfigError(f"importance method '{method}' is unknown; choose one of {', '.join(IMPORTANCE_METHODS)}")
    _check_windows(calib)
    started = time.perf_counter()
    if method == "owl":
        scores = owl_importance(adapter, calib, owl_m, batch_size=batch_size)
    else:
        compute = removal_importance if method == "removal" else activation_importance
        scores = compute(adapter, calib, batch_size=batch_size)
    seconds = time.perf_counter() - started
    logger.info("layer importance (%s) of %s in %.1fs: %s", method, model_name, seconds,
                ", ".join(f"{s:.4g}" for s in scores))
    return LayerImportance(
        scores=[float(s) for s in scores],
        method=method,
        model=model_name,
        num_layers=len(scores),
        samples=int(calib.shape[0]),
        seqlen=int(calib.shape[1]),
        seed=int(seed),
        data=data_desc,
        seconds=seconds,
        owl_m=float(owl_m) if method == "owl" else None,
    )
