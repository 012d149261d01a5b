"""What a trial computes of the dense model, computed once per key through the cache.

Every cache key is built here, so two values can never share a key by accident and a new
cached value is one function in this file. Keys are made of *content*, not names: the model
is its fingerprint (config and weight digests, or hub id and revision), the tokenizer its
serialised form, and each text the digest of the very tokens the value was computed from
(so a window count, a seed or an edited file all change the key through the data). Then
come the settings of the computation and the numerics it ran in (dtype, device). A
different model saved at the same path gets new entries; a moved model folder keeps its
entries. Without a cache (a trial outside a search, no --stats-cache) each value is
computed directly.

Cached: dense perplexity and lm-eval accuracy (validation and test), layer importance, Taylor scores, and the
result of the first pruning step of the dense model (masks; for SparseGPT, which also
updates the weights it keeps, the pruned weights of the prunable linears too), which trials
that differ only in recovery settings share.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence, TypeVar

import torch

from raysparse.config import TrialConfig
from raysparse.data.sources import resolve_source, tokenizer_fingerprint
from raysparse.models.fingerprint import model_fingerprint
from raysparse.prune import prune
from raysparse.sparsity.importance import LayerImportance, compute_importance
from raysparse.sparsity.masks import Masks, apply_masks
from raysparse.structured.taylor import timed_taylor_scores
from raysparse.trial.context import TrialContext

T = TypeVar("T")

KEY_VERSION = 2  # bump when a cached value's meaning changes: old entries are then never read


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and values (the token windows a value was computed from)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:32]


def _memo(ctx: TrialContext, name: str, make: Callable[[], str]) -> str:
    """Fingerprints are computed once per trial (the model's files once per machine)."""
    if name not in ctx.fingerprints:
        ctx.fingerprints[name] = make()
    return ctx.fingerprints[name]


def _tokens(ctx: TrialContext, name: str, tensor: torch.Tensor | None) -> str | None:
    return None if tensor is None else _memo(ctx, f"tokens:{name}", lambda: tensor_digest(tensor))


def model_key(ctx: TrialContext) -> dict[str, Any]:
    """The dense model as content: weights, tokenizer, and the numerics it runs in."""
    loaded = ctx.loaded
    revision = getattr(loaded.model.config, "_commit_hash", None)
    return {"model": _memo(ctx, "model", lambda: model_fingerprint(loaded.path, revision)),
            "tokenizer": _memo(ctx, "tokenizer", lambda: tokenizer_fingerprint(loaded.tokenizer)),
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            "device": ctx.device.type}


def _base_key(ctx: TrialContext, kind: str) -> dict[str, Any]:
    return {"kind": kind, "version": KEY_VERSION, **model_key(ctx)}


def _calibration_data(ctx: TrialContext) -> str:
    return resolve_source(ctx.settings.calib_data, "calibration").describe()


def dense_ppl_key(ctx: TrialContext, role: str = "validation") -> dict[str, Any]:
    settings = ctx.settings
    stream = ctx.test_stream if role == "test" else ctx.val_stream
    key = {**_base_key(ctx, "dense_ppl"), "role": role, "tokens": _tokens(ctx, role, stream),
           "eval_seqlen": settings.eval_seqlen, "eval_stride": settings.eval_stride,
           "eval_max_windows": ctx.config.eval_max_windows}
    if ctx.config.eval_max_tokens is not None:  # only when set: existing caches keep their keys
        key["eval_max_tokens"] = ctx.config.eval_max_tokens
    return key


def dense_zeroshot_key(ctx: TrialContext, role: str) -> dict[str, Any]:
    """The tasks as content: their folders' YAMLs, versions and the settings of the run."""
    from raysparse.metrics.zeroshot import tasks_digest

    spec, protocol = ctx.tasks, ctx.tasks_protocol or {}
    return {**_base_key(ctx, "dense_zeroshot"), "role": role, "tasks": list(spec.names),
            "versions": {name: t.get("version") for name, t in protocol.get("tasks", {}).items()},
            "task_files": _memo(ctx, "task_files", lambda: tasks_digest(spec)), "lm_eval": protocol.get("lm_eval"),
            "limit": spec.limit, "fewshot": spec.fewshot, "batch_size": spec.batch_size}


def layer_importance_key(ctx: TrialContext) -> dict[str, Any]:
    config = ctx.config
    return {**_base_key(ctx, "layer_importance"), "tokens": _tokens(ctx, "importance", ctx.importance_calib),
            "method": config.importance_method, "samples": config.importance_samples,
            "seqlen": ctx.settings.seqlen, "seed": config.seed,
            **({"owl_m": config.owl_m} if config.importance_method == "owl" else {})}


def taylor_key(ctx: TrialContext, indices: Sequence[int]) -> dict[str, Any]:
    config = ctx.config
    return {**_base_key(ctx, "taylor_scores"), "tokens": _tokens(ctx, "taylor", ctx.taylor_windows),
            "examples": config.num_examples, "seqlen": ctx.settings.taylor_seqlen, "seed": config.seed,
            "layers": list(indices)}


def pruning_key(ctx: TrialContext, config: TrialConfig, ratios: Sequence[float] | None) -> dict[str, Any]:
    """Everything that determines the first pruning step's result on the dense model."""
    key = {**_base_key(ctx, "prune_masks"), "method": config.method, "pattern": config.pattern.label,
           "sparsity": config.sparsity, "layer_ratios": None if ratios is None else [float(r) for r in ratios]}
    if config.method == "magnitude":
        return {**key, "magnitude_scope": config.magnitude_scope}
    key.update(tokens=_tokens(ctx, "calibration", ctx.calib), nsamples=config.nsamples, seqlen=ctx.settings.seqlen,
               seed=config.seed, calib_batch_size=config.calib_batch_size)
    if config.calibration_passes != "two":  # only when set: existing caches keep their keys
        key["calibration_passes"] = config.calibration_passes
    if config.method == "sparsegpt":
        key.update(percdamp=config.percdamp, blocksize=config.blocksize)
    return key


def profile_layer_key(ctx: TrialContext, config: TrialConfig, index: int, levels: Sequence[float],
                      anchor: Sequence[float] | None = None) -> dict[str, Any]:
    """One decoder layer pruned at every level of a profile search's grid, on the dense model's
    inputs, or (`anchor`: the anchor ratios of this layer and every earlier one) on the inputs
    the earlier layers give when pruned at the anchor."""
    key = {**_base_key(ctx, "profile_layer"), "format": "packed", "method": config.method, "layer": int(index),
           "levels": [float(v) for v in levels], "tokens": _tokens(ctx, "calibration", ctx.calib),
           "inputs": "dense" if anchor is None else {"anchor": [float(a) for a in anchor[:index + 1]]},
           "nsamples": config.nsamples, "seqlen": ctx.settings.seqlen, "seed": config.seed,
           "calib_batch_size": config.calib_batch_size}
    if config.method == "sparsegpt":
        key.update(percdamp=config.percdamp, blocksize=config.blocksize)
    return key


def _cached(ctx: TrialContext, key: Callable[[], dict[str, Any]], compute: Callable[[], T]) -> T:
    """The key is built only with a cache: fingerprinting a large model is not free."""
    return compute() if ctx.cache is None else ctx.cache.get_or_compute(key(), compute)


def dense_perplexity(ctx: TrialContext) -> float:
    """The unpruned model's validation perplexity: computed once per key across a search's trials."""
    return _cached(ctx, lambda: dense_ppl_key(ctx), lambda: ctx.evaluate(desc="dense perplexity"))


def dense_test_perplexity(ctx: TrialContext) -> float:
    """The unpruned model's test perplexity (reported beside the pruned model's)."""
    return _cached(ctx, lambda: dense_ppl_key(ctx, "test"), lambda: ctx.evaluate_test(desc="dense test perplexity"))


def dense_zeroshot(ctx: TrialContext, role: str = "validation") -> dict[str, Any] | None:
    """The unpruned model's lm-eval accuracy (None without --eval-tasks): once per key across a search."""
    if ctx.tasks is None:
        return None
    return _cached(ctx, lambda: dense_zeroshot_key(ctx, role),
                   lambda: ctx.zeroshot(role, desc=f"dense zero-shot ({role})"))


def layer_importance(ctx: TrialContext) -> dict[str, Any]:
    """Importance of every decoder layer of the dense model: loaded from --importance-config,
    or computed once per key and shared through the cache."""
    config = ctx.config
    if config.importance_config:
        layers = len(ctx.loaded.adapter.decoder_layers())
        return LayerImportance.load(config.importance_config, expected_model=config.model,
                                    expected_layers=layers).to_dict()
    def compute() -> dict[str, Any]:
        with ctx.on_device():
            return compute_importance(ctx.loaded.adapter, ctx.importance_calib, config.importance_method,
                                      config.model, config.seed, _calibration_data(ctx),
                                      batch_size=config.calib_batch_size, owl_m=config.owl_m).to_dict()

    value = _cached(ctx, lambda: layer_importance_key(ctx), compute)
    # The same content may have been computed under other names: record this trial's.
    return {**value, "model": config.model, "data": _calibration_data(ctx)}


def taylor_scores(ctx: TrialContext, indices: Sequence[int]) -> dict[str, Any]:
    """Taylor scores of the dense model's layers `indices`: computed once per key. With --offload
    they come from the layer-by-layer walk (the same scores, one decoder layer on the device)."""
    return _cached(ctx, lambda: taylor_key(ctx, indices), lambda: timed_taylor_scores(
        ctx.loaded.adapter, ctx.taylor_windows, list(indices), ctx.device, ctx.config.calib_batch_size,
        layerwise=ctx.config.offload != "none"))


def prune_dense(ctx: TrialContext, config: TrialConfig, ratios: list[float] | None) -> Masks:
    """Prune the still dense model in place with `config`; return its masks.

    Computed once per pruning key: a trial served the result applies it (SparseGPT's
    updated weights, then the masks) and ends with the very model the computing trial got.
    """
    adapter, model = ctx.loaded.adapter, ctx.loaded.model
    ran: list[Masks] = []

    def compute() -> dict[str, Any]:
        masks = prune(adapter, config, ctx.calib, ctx.device, ratios)
        apply_masks(model, masks)
        ran.append(masks)
        value: dict[str, Any] = {"masks": {name: mask.cpu() for name, mask in masks.items()}}
        if config.method == "sparsegpt":  # it also updated the weights it kept
            value["weights"] = {name: p.detach().cpu().clone() for name, p in adapter.prunable_weights().items()}
        return value

    value = _cached(ctx, lambda: pruning_key(ctx, config, ratios), compute)
    if ran:
        return ran[0]
    with torch.no_grad():
        weights = adapter.prunable_weights()
        for name, weight in (value.get("weights") or {}).items():
            weights[name].data.copy_(weight)
    masks = {name: mask.clone() for name, mask in value["masks"].items()}  # own memory, not the object store's
    apply_masks(model, masks)
    return masks
