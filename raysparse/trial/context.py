"""Everything the steps of a trial share: model, data streams, device, timer, statistics cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raysparse.config import TrialConfig
from raysparse.data.sources import calibration_windows, resolve_source, token_stream
from raysparse.metrics.perplexity import perplexity
from raysparse.metrics.resources import PhaseTimer
from raysparse.models.loading import LoadedModel, load_model, resolve_device
from raysparse.trial.cache import StatsCache
from raysparse.trial.settings import ResolvedSettings, check_output_dir, resolve_settings


@dataclass
class TrialContext:
    """What every step of a trial shares: model, data, device, timers."""

    config: TrialConfig
    settings: ResolvedSettings
    loaded: LoadedModel
    device: torch.device
    eval_stream: torch.Tensor
    calib: torch.Tensor | None
    importance_calib: torch.Tensor | None
    train_windows: torch.Tensor | None
    timer: PhaseTimer
    cache: Any = None  # a StatsCache when the trial runs inside a search
    taylor_windows: torch.Tensor | None = None  # structured pruning's Taylor importance data

    def evaluate(self, model: torch.nn.Module | None = None, desc: str = "perplexity") -> float:
        return perplexity(
            model if model is not None else self.loaded.model, self.eval_stream, self.settings.eval_seqlen,
            self.settings.eval_stride, batch_size=self.config.eval_batch_size,
            max_windows=self.config.eval_max_windows, device=self.device, desc=desc,
        ).ppl


def _prepare(config: TrialConfig) -> TrialContext:
    config.validate()
    check_output_dir(config.output)
    settings = resolve_settings(config)
    calib_source = resolve_source(settings.calib_data, "calibration")
    eval_source = resolve_source(settings.eval_data, "test")
    train_source = resolve_source(settings.train_data, "calibration") if config.recovery != "none" else None
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    timer = PhaseTimer()
    with timer.phase("load"):
        loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code)
        loaded.model.to(device)
    with timer.phase("data"):
        eval_stream = token_stream(loaded.tokenizer, eval_source)
        calib = importance_calib = taylor_windows = None
        if config.is_structured:
            taylor_windows = calibration_windows(token_stream(loaded.tokenizer, calib_source), config.num_examples,
                                                 settings.taylor_seqlen, config.seed)
        elif config.method != "magnitude":
            calib = calibration_windows(token_stream(loaded.tokenizer, calib_source), config.nsamples,
                                        settings.seqlen, config.seed)
        if config.pruning_strategy != "uniform" and not config.importance_config:
            importance_calib = calibration_windows(token_stream(loaded.tokenizer, calib_source),
                                                   config.importance_samples, settings.seqlen, config.seed)
        train_windows = None
        if train_source is not None:
            # A different seed than calibration, so training does not just replay the calibration windows.
            train_windows = calibration_windows(token_stream(loaded.tokenizer, train_source), config.train_samples,
                                                settings.train_seqlen, config.seed + 1)
    cache = None
    if config.stats_cache:
        cache = StatsCache(config.stats_cache)
    return TrialContext(config, settings, loaded, device, eval_stream, calib, importance_calib, train_windows,
                        timer, cache, taylor_windows)
