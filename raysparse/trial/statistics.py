"""Statistics of the dense model, computed once per key through the statistics cache."""
from __future__ import annotations

from typing import Any

from raysparse.data.sources import resolve_source
from raysparse.sparsity.importance import LayerImportance, compute_importance
from raysparse.trial.context import TrialContext


def dense_perplexity(ctx: TrialContext) -> float:
    """The unpruned model's perplexity: computed once per key across a search's trials."""
    if ctx.cache is None:
        return ctx.evaluate(desc="dense perplexity")
    config, settings = ctx.config, ctx.settings
    parts = {"kind": "dense_ppl", "model": ctx.loaded.path, "eval_data": settings.eval_data,
             "eval_seqlen": settings.eval_seqlen, "eval_stride": settings.eval_stride,
             "eval_max_windows": config.eval_max_windows, "dtype": config.dtype, "device": ctx.device.type,
             "eval_tokens": int(ctx.eval_stream.numel())}
    return ctx.cache.get_or_compute(parts, lambda: ctx.evaluate(desc="dense perplexity"))


def layer_importance(ctx: TrialContext) -> dict[str, Any]:
    """Importance of every decoder layer of the dense model: loaded from --importance-config,
    or computed once per key and shared through the statistics cache."""

    config = ctx.config
    layers = len(ctx.loaded.adapter.decoder_layers())
    if config.importance_config:
        return LayerImportance.load(config.importance_config, expected_model=config.model,
                                    expected_layers=layers).to_dict()
    data_desc = resolve_source(ctx.settings.calib_data, "calibration").describe()

    def compute() -> dict[str, Any]:
        return compute_importance(ctx.loaded.adapter, ctx.importance_calib, config.importance_method, config.model,
                                  config.seed, data_desc, batch_size=config.calib_batch_size).to_dict()

    if ctx.cache is None:
        return compute()
    parts = {"kind": "layer_importance", "model": ctx.loaded.path, "data": data_desc,
             "method": config.importance_method, "samples": config.importance_samples,
             "seqlen": ctx.settings.seqlen, "seed": config.seed, "dtype": config.dtype}
    return ctx.cache.get_or_compute(parts, compute)
