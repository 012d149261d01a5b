"""One pruning run end to end: load, calibrate, evaluate dense, prune, evaluate, save.

`prune_model` is the library entry point behind `launch/prune.py`; searches call the same
function, so a number seen in a search is reproduced exactly by the CLI. Every setting
that can be checked without weights is checked before anything is loaded, and nothing is
written to the output folder until the results exist, so a failed run leaves no half
summary behind.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from . import __version__
from .config import DEFAULT_MAX_WINDOW, PruneConfig
from .data import calibration_windows, resolve_source, token_stream
from .errors import ConfigError
from .evaluate import PerplexityResult, perplexity
from .masks import Masks, measure_sparsity, save_masks, verify_masks
from .models import LoadedModel, load_config, load_model, resolve_device, resolve_model_path
from .prune import prune

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"


@dataclass
class ResolvedSettings:
    """Settings that depend on the model (windows) or on the preset (default data)."""

    calib_data: str
    eval_data: str
    seqlen: int
    eval_seqlen: int
    eval_stride: int
    context_length: int


@dataclass
class PruneResult:
    summary: dict[str, Any]
    loaded: LoadedModel
    masks: Masks = field(repr=False, default_factory=dict)


class PhaseTimer:
    """Wall time per named phase, so users see where an hour went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if platform.system() != "Darwin" else rss_kb / 2**20


def resolve_settings(config: PruneConfig) -> ResolvedSettings:
    """Fill defaults that depend on the model and check windows against its context."""
    from .models import adapter_class_for
    from .tiny import TINY_PRESET_NAME

    path = resolve_model_path(config.model)
    model_config = load_config(path, config.trust_remote_code)
    context = adapter_class_for(model_config.model_type).context_length_of(model_config)
    default_window = min(context, DEFAULT_MAX_WINDOW)
    for name in ("seqlen", "eval_seqlen"):
        value = getattr(config, name)
        if value is not None and value > context:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{name} {value} is larger than the model's context of {context} tokens: use {flag} {context} or less"
            )
    is_tiny = config.model == TINY_PRESET_NAME
    eval_seqlen = config.eval_seqlen or default_window
    return ResolvedSettings(
        calib_data=config.calib_data or ("pydoc" if is_tiny else "c4"),
        eval_data=config.eval_data or ("pydoc" if is_tiny else "wikitext2"),
        seqlen=config.seqlen or default_window,
        eval_seqlen=eval_seqlen,
        eval_stride=config.eval_stride or eval_seqlen,
        context_length=context,
    )


def check_output_dir(output: str | None) -> None:
    if output is None:
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory: choose another --output")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output {output} is not writable: choose another --output")


def evaluate_model(loaded: LoadedModel, stream: torch.Tensor, settings: ResolvedSettings,
                   config: PruneConfig, device: torch.device, desc: str) -> PerplexityResult:
    return perplexity(
        loaded.model, stream, settings.eval_seqlen, settings.eval_stride,
        batch_size=config.eval_batch_size, max_windows=config.eval_max_windows, device=device, desc=desc,
    )


def prune_model(config: PruneConfig | Mapping[str, Any]) -> PruneResult:
    """Prune one model one-shot and measure it; write `summary.json` (and the model) if asked."""
    if not isinstance(config, PruneConfig):
        config = PruneConfig.from_dict(config)
    config.validate()
    check_output_dir(config.output)
    settings = resolve_settings(config)
    calib_source = resolve_source(settings.calib_data, "calibration")
    eval_source = resolve_source(settings.eval_data, "evaluation")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    timer = PhaseTimer()

    with timer.phase("load"):
        loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code)
        loaded.model.to(device)
    with timer.phase("data"):
        eval_stream = token_stream(loaded.tokenizer, eval_source)
        calib = None
        if config.method != "magnitude":
            calib_stream = token_stream(loaded.tokenizer, calib_source)
            calib = calibration_windows(calib_stream, config.nsamples, settings.seqlen, config.seed)
    with timer.phase("eval_dense"):
        dense = evaluate_model(loaded, eval_stream, settings, config, device, "dense perplexity")
    logger.info("dense perplexity %.3f", dense.ppl)
    with timer.phase("prune"):
        masks = prune(loaded.adapter, config, calib, device)
    verify_masks(loaded.model, masks)
    report = measure_sparsity(loaded.adapter)
    with timer.phase("eval_pruned"):
        pruned = evaluate_model(loaded, eval_stream, settings, config, device, "pruned perplexity")
    logger.info("pruned perplexity %.3f at sparsity %.4f", pruned.ppl, report.overall)

    summary: dict[str, Any] = {
        "model": config.model,
        "model_path": loaded.path,
        "family": loaded.adapter.family,
        "method": config.method,
        "pattern": config.pattern.label,
        "sparsity_target": config.pattern.ratio,
        "sparsity_measured": report.overall,
        "ppl_dense": dense.ppl,
        "ppl_pruned": pruned.ppl,
        "ppl_change_pct": 100.0 * (pruned.ppl - dense.ppl) / dense.ppl,
        "per_layer": report.to_dict()["per_layer"],
        "per_weight": report.per_weight,
        "params_prunable": report.total_params,
        "params_zero": report.zero_params,
        "timings_s": timer.seconds,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "protocol": {
            "eval_data": eval_source.describe(),
            "eval_seqlen": settings.eval_seqlen,
            "eval_stride": settings.eval_stride,
            "eval_windows": pruned.windows,
            "eval_tokens_scored": pruned.tokens_scored,
            "calib_data": calib_source.describe() if calib is not None else None,
            "nsamples": config.nsamples if calib is not None else 0,
            "seqlen": settings.seqlen,
            "seed": config.seed,
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
            "context_length": settings.context_length,
        },
        "versions": {"raysparse": __version__, "torch": torch.__version__, "transformers": _transformers_version()},
        "config": config.to_dict(),
    }
    if config.output:
        with timer.phase("save"):
            write_outputs(Path(config.output), summary, loaded, masks, save_model=config.save)
        summary["timings_s"] = timer.seconds
        _write_json_atomic(Path(config.output) / SUMMARY_FILE, summary)
    return PruneResult(summary=summary, loaded=loaded, masks=masks)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def write_outputs(output: Path, summary: dict[str, Any], loaded: LoadedModel, masks: Masks,
                  save_model: bool) -> None:
    """Write the model (optional) then the summary; a failure removes what this call created."""
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=output)) if save_model else None
    try:
        if staging is not None:
            loaded.model.save_pretrained(staging, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staging)
            save_masks(masks, staging)
            final = output / MODEL_DIR
            if final.exists():
                shutil.rmtree(final)
            staging.replace(final)
            summary["saved_model"] = str(final)
        _write_json_atomic(output / SUMMARY_FILE, summary)
    except BaseException:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
