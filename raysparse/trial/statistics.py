"""Statistics of the dense model, computed once per key through the statistics cache.

Every cache key is built here, from one base (model, dtype, device) plus what the statistic
depends on, so two statistics can never share a key by accident and a new statistic is one
function in this file. Without a cache (a trial outside a search) each is computed directly.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from raysparse.data.sources import resolve_source
from raysparse.sparsity.importance import LayerImportance, compute_importance
from raysparse.structured.taylor import timed_taylor_scores
from raysparse.trial.context import TrialContext

T = TypeVar("T")


def _base_key(ctx: TrialContext, kind: str) -> dict[str, Any]:
    return {"kind": kind, "model": ctx.loaded.path, "dtype": ctx.config.dtype}


def _calibration_data(ctx: TrialContext) -> str:
    return resolve_source(ctx.settings.calib_data, "calibration").describe()


def dense_ppl_key(ctx: TrialContext, role: str = "validation") -> dict[str, Any]:
    settings = ctx.settings
    stream = ctx.test_stream if role == "test" else ctx.val_stream
    data = settings.eval_data if role == "test" or settings.val_data is None else settings.val_data
    return {**_base_key(ctx, "dense_ppl"), "role": role, "eval_data": data, "eval_seqlen": settings.eval_seqlen,
            "eval_stride": settings.eval_stride, "eval_max_windows": ctx.config.eval_max_windows,
            "device": ctx.device.type, "eval_tokens": int(stream.numel())}


def layer_importance_key(ctx: TrialContext) -> dict[str, Any]:
    config = ctx.config
    return {**_base_key(ctx, "layer_importance"), "data": _calibration_data(ctx),
            "method": config.importance_method, "samples": config.importance_samples,
            "seqlen": ctx.settings.seqlen, "seed": config.seed}


def taylor_key(ctx: TrialContext, indices: Sequence[int]) -> dict[str, Any]:
    config = ctx.config
    return {**_base_key(ctx, "taylor_scores"), "data": _calibration_data(ctx), "examples": config.num_examples,
            "seqlen": ctx.settings.taylor_seqlen, "seed": config.seed, "layers": list(indices),
            "device": ctx.device.type}


def _cached(ctx: TrialContext, key: dict[str, Any], compute: Callable[[], T]) -> T:
    return compute() if ctx.cache is None else ctx.cache.get_or_compute(key, compute)


def dense_perplexity(ctx: TrialContext) -> float:
    """The unpruned model's validation perplexity: computed once per key across a search's trials."""
    return _cached(ctx, dense_ppl_key(ctx), lambda: ctx.evaluate(desc="dense perplexity"))


def dense_test_perplexity(ctx: TrialContext) -> float:
    """The unpruned model's test perplexity (reported beside the pruned model's)."""
    return _cached(ctx, dense_ppl_key(ctx, "test"), lambda: ctx.evaluate_test(desc="dense test perplexity"))


def layer_importance(ctx: TrialContext) -> dict[str, Any]:
    """Importance of every decoder layer of the dense model: loaded from --importance-config,
    or computed once per key and shared through the statistics cache."""
    config = ctx.config
    if config.importance_config:
        layers = len(ctx.loaded.adapter.decoder_layers())
        return LayerImportance.load(config.importance_config, expected_model=config.model,
                                    expected_layers=layers).to_dict()
    return _cached(ctx, layer_importance_key(ctx), lambda: compute_importance(
        ctx.loaded.adapter, ctx.importance_calib, config.importance_method, config.model, config.seed,
        _calibration_data(ctx), batch_size=config.calib_batch_size).to_dict())


def taylor_scores(ctx: TrialContext, indices: Sequence[int]) -> dict[str, Any]:
    """Taylor scores of the dense model's layers `indices`: computed once per key."""
    return _cached(ctx, taylor_key(ctx, indices), lambda: timed_taylor_scores(
        ctx.loaded.adapter, ctx.taylor_windows, list(indices), ctx.device, ctx.config.calib_batch_size))
