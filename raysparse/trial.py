"""One trial end to end: load, evaluate dense, then for each schedule step prune, evaluate,
recover, evaluate; verify masks, write the summary (and the model).

`run_trial` is the single code path behind `launch/prune.py` and, later, every trial of a
search, so a number seen in a search is reproduced exactly by the CLI. Each finished
iteration is reported through a `Reporter` callback and checkpointed in the output folder;
starting the same trial again with the same `--output` continues after the last finished
iteration. Every setting that can be checked without weights is checked before anything is
loaded, and outputs are written through temporary files renamed into place, so a failed or
interrupted run never leaves a half-written summary or model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from . import __version__
from .config import DEFAULT_MAX_WINDOW, TrialConfig
from .data import calibration_windows, resolve_source, token_stream
from .errors import ConfigError, RaysparseError
from .evaluate import perplexity, window_starts
from .masks import Masks, apply_masks, load_masks, masks_from_weights, measure_sparsity, save_masks, verify_masks
from .paths import write_json_atomic
from .models import (LoadedModel, count_params, get_adapter, load_config, load_model, resolve_device,
                     resolve_model_path)
from .prune import prune
from .schedule import sparsity_schedule

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"
RAY_TRAIN_DIR = "ray_train"  # per-epoch checkpoints of distributed recovery
STATE_FILE = "state.json"
# Settings that may change between an interrupted run and its resumption.
RESUME_IGNORED = ("output", "save", "resume", "device", "eval_batch_size", "stats_cache")

Reporter = Callable[[dict[str, Any]], None]


class TrialFailed(RaysparseError):
    """The trial stopped (e.g. NaN loss); finished iterations are kept in the output folder."""


@dataclass
class ResolvedSettings:
    """Settings that depend on the model (windows) or on the preset (default data)."""

    calib_data: str
    eval_data: str
    train_data: str
    seqlen: int
    eval_seqlen: int
    eval_stride: int
    train_seqlen: int
    context_length: int
    layer_start: int = 0
    layer_end: int = 0  # exclusive; structured pruning touches only layers in [start, end)
    taylor_seqlen: int = 0


@dataclass
class TrialResult:
    summary: dict[str, Any]
    loaded: LoadedModel
    masks: Masks = field(repr=False, default_factory=dict)


PruneResult = TrialResult


@dataclass
class TrialState:
    """What a resumed trial needs: the schedule, what finished, and the history so far."""

    config: dict[str, Any]
    levels: list[float]
    ppl_dense: float
    start_sparsity: float
    completed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    layer_importance: dict[str, Any] | None = None


class PhaseTimer:
    """Wall time per named phase, so users see where an hour went."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})

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


def resolve_settings(config: TrialConfig) -> ResolvedSettings:
    """Fill defaults that depend on the model and check windows against its context."""
    from .models import adapter_class_for
    from .tiny import TINY_PRESET_NAME

    path = resolve_model_path(config.model)
    model_config = load_config(path, config.trust_remote_code)
    context = adapter_class_for(model_config.model_type).context_length_of(model_config)
    default_window = min(context, DEFAULT_MAX_WINDOW)
    for name in ("seqlen", "eval_seqlen", "train_seqlen"):
        value = getattr(config, name)
        if value is not None and value > context:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{name} {value} is larger than the model's context of {context} tokens: use {flag} {context} or less"
            )
    num_layers = adapter_class_for(model_config.model_type).num_layers_of(model_config)
    layer_end = config.layer_end if config.layer_end is not None else num_layers
    if config.layer_start >= num_layers or layer_end > num_layers:
        raise ConfigError(
            f"layer range [{config.layer_start}, {layer_end}) is outside the model's {num_layers} decoder layers: "
            f"use --layer-start/--layer-end within 0..{num_layers}"
        )
    is_tiny = config.model == TINY_PRESET_NAME
    calib_data = config.calib_data or ("pydoc" if is_tiny else "c4")
    eval_seqlen = config.eval_seqlen or default_window
    seqlen = config.seqlen or default_window
    return ResolvedSettings(
        calib_data=calib_data,
        eval_data=config.eval_data or ("pydoc" if is_tiny else "wikitext2"),
        train_data=config.train_data or calib_data,
        seqlen=seqlen,
        eval_seqlen=eval_seqlen,
        eval_stride=config.eval_stride or eval_seqlen,
        train_seqlen=config.train_seqlen or seqlen,
        context_length=context,
        layer_start=config.layer_start,
        layer_end=layer_end,
        taylor_seqlen=min(config.max_seq_len, context),
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


# --- checkpoints -----------------------------------------------------------------------

def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_IGNORED}


def load_trial_state(output: Path, config: TrialConfig) -> TrialState | None:
    """The checkpointed state of this same trial in `output`, or None to start fresh."""
    state_file = output / CHECKPOINT_DIR / STATE_FILE
    if not config.resume or not state_file.is_file():
        return None
    state = TrialState(**json.loads(state_file.read_text(encoding="utf-8")))
    saved, wanted = _comparable(state.config), _comparable(config.to_dict())
    if saved != wanted:
        differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ConfigError(
            f"{output} holds a checkpoint of a different trial (settings differ: {', '.join(differing)}): "
            "use another --output, or --no-resume to start over"
        )
    return state


def save_checkpoint(output: Path, state: TrialState, loaded: LoadedModel, masks: Masks) -> None:
    """Write weights, masks and state to a fresh folder, then swap it in (never half-written)."""
    from safetensors.torch import save_model

    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=output))
    save_model(loaded.model, str(staging / "model.safetensors"))
    save_masks(masks, staging)
    write_json_atomic(staging / STATE_FILE, dataclasses.asdict(state))
    final = output / CHECKPOINT_DIR
    old = output / ".checkpoint-old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
    staging.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(output: Path, loaded: LoadedModel) -> Masks:
    from safetensors.torch import load_model as load_weights

    load_weights(loaded.model, str(output / CHECKPOINT_DIR / "model.safetensors"))
    return load_masks(output / CHECKPOINT_DIR)


# --- the trial -------------------------------------------------------------------------

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
    from .importance import LayerImportance, compute_importance

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


def layer_ratios(ctx: TrialContext, state: TrialState, level: float) -> list[float] | None:
    """Per-layer ratios for one schedule step, weighted by each layer's prunable parameters."""
    config = ctx.config
    if config.pruning_strategy == "uniform":
        return None
    from .allocate import allocate_ratios

    sizes = [sum(m.weight.numel() for m in ctx.loaded.adapter.prunable_linears(layer).values())
             for layer in ctx.loaded.adapter.decoder_layers()]
    return allocate_ratios(state.layer_importance["scores"], level, config.pruning_strategy, config.alpha,
                           config.min_pruning_rate, config.max_pruning_rate, layer_sizes=sizes)


def _prepare(config: TrialConfig) -> TrialContext:
    config.validate()
    check_output_dir(config.output)
    settings = resolve_settings(config)
    calib_source = resolve_source(settings.calib_data, "calibration")
    eval_source = resolve_source(settings.eval_data, "evaluation")
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
        from .cache import StatsCache

        cache = StatsCache(config.stats_cache)
    return TrialContext(config, settings, loaded, device, eval_stream, calib, importance_calib, train_windows,
                        timer, cache, taylor_windows)


def _train_settings(config: TrialConfig, device: torch.device):
    from .recover.training import TrainSettings

    bf16 = config.bf16 in (True, "true") or (config.bf16 == "auto" and device.type == "cuda"
                                               and torch.cuda.is_bf16_supported())
    return TrainSettings(
        lr=config.effective_lr(), epochs=config.epochs_per_iteration, batch_size=config.batch_size,
        max_steps_per_epoch=config.effective_max_steps(), grad_accum=config.grad_accum,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, bf16=bf16,
        early_stopping_patience=config.early_stopping_patience, keep_best=config.keep_best, seed=config.seed,
    )


def _recover(ctx: TrialContext, masks: Masks, iteration: int, ppl_after_prune: float) -> dict[str, Any]:
    """Run the configured recovery; return what the iteration record needs."""
    config = ctx.config
    settings = _train_settings(config, ctx.device)
    if config.recovery == "lora":
        from .recover.lora import LoraSettings, train_lora

        adapter_dir = Path(config.output) / "adapters" / f"iter_{iteration:03d}" if config.output else None
        outcome = train_lora(
            ctx.loaded.model, masks, ctx.train_windows, settings,
            LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets),
            lambda model: ctx.evaluate(model, "perplexity (LoRA)"), adapter_dir=adapter_dir,
            device=ctx.device, baseline_ppl=ppl_after_prune,
        )
        ctx.loaded.model = outcome.model
        ctx.loaded.adapter = get_adapter(outcome.model)
        return {"train": outcome.train, "ppl_after_train": outcome.ppl_masked_merge,
                "ppl_with_adapter": outcome.ppl_with_adapter, "adapter_dir": outcome.adapter_dir}
    if config.workers > 1:
        from .recover.distributed import EvalSpec, train_masked_distributed

        storage = Path(config.output).resolve() / RAY_TRAIN_DIR if config.output else Path(tempfile.mkdtemp())
        result = train_masked_distributed(
            ctx.loaded.model, masks, ctx.train_windows, settings,
            EvalSpec(ctx.eval_stream, ctx.settings.eval_seqlen, ctx.settings.eval_stride,
                     config.eval_batch_size, config.eval_max_windows),
            workers=config.workers, storage_path=str(storage), run_name=f"recovery-iter{iteration:03d}",
            use_gpu=ctx.device.type == "cuda",
        )
        return {"train": result, "ppl_after_train": result.final_ppl, "workers": config.workers}
    from .recover.masked import train_masked

    result = train_masked(ctx.loaded.model, masks, ctx.train_windows, settings,
                          lambda: ctx.evaluate(desc="perplexity (epoch)"), device=ctx.device,
                          baseline_ppl=ppl_after_prune)
    return {"train": result, "ppl_after_train": result.final_ppl}


def _combine(previous: Masks | None, new: Masks) -> Masks:
    """Pruned stays pruned: a later step can only add zeros to an earlier step's mask."""
    if previous is None:
        return new
    return {name: mask & previous[name] for name, mask in new.items()}


def recovery_pct(before: float, after_prune: float, after_train: float) -> float | None:
    """Share of the perplexity lost to pruning that training won back (100 = all of it)."""
    lost = after_prune - before
    if not math.isfinite(lost) or lost <= 0:
        return None
    return 100.0 * (after_prune - after_train) / lost


def run_trial(config: TrialConfig | Mapping[str, Any], reporter: Reporter | None = None) -> TrialResult:
    """Run one trial (one-shot or iterative, with or without recovery) and return its summary."""
    if not isinstance(config, TrialConfig):
        config = TrialConfig.from_dict(config)
    ctx = _prepare(config)
    output = Path(config.output) if config.output else None
    state = load_trial_state(output, config) if output else None
    masks: Masks | None = None
    if state is not None:
        masks = restore_checkpoint(output, ctx.loaded)
        ctx.timer = PhaseTimer(state.timings_s)
        logger.info("resuming %s after iteration %d of %d", output, state.completed, len(state.levels))
    else:
        if output:  # a fresh start: epoch checkpoints of an earlier run must not be resumed
            shutil.rmtree(output / RAY_TRAIN_DIR, ignore_errors=True)
        with ctx.timer.phase("eval_dense"):
            ppl_dense = dense_perplexity(ctx)
        logger.info("dense perplexity %.4f", ppl_dense)
        start = measure_sparsity(ctx.loaded.adapter).overall
        levels = sparsity_schedule(config.schedule, config.target_ratio, config.prune_percentage,
                                   start, config.max_iterations)
        state = TrialState(config=config.to_dict(), levels=levels, ppl_dense=ppl_dense, start_sparsity=start)
        if config.pruning_strategy != "uniform":
            with ctx.timer.phase("importance"):
                state.layer_importance = layer_importance(ctx)

    for index in range(state.completed, len(state.levels)):
        record, masks = _run_iteration(ctx, state, index, masks)
        state.history.append(record)
        state.completed = index + 1
        state.timings_s = ctx.timer.seconds
        if output and state.completed < len(state.levels):
            save_checkpoint(output, state, ctx.loaded, masks)
        if reporter is not None:
            reporter(dict(record))
    if masks is None:  # nothing left to do (a resumed, finished trial)
        masks = masks_from_weights(ctx.loaded.adapter)
    verify_masks(ctx.loaded.model, masks)
    summary = build_summary(ctx, state)
    if output:
        with ctx.timer.phase("save"):
            write_outputs(output, summary, ctx.loaded, masks, save_model=config.save)
        summary["timings_s"] = ctx.timer.seconds
        write_json_atomic(output / SUMMARY_FILE, summary)
        for leftover in (CHECKPOINT_DIR, RAY_TRAIN_DIR):  # finished: the summary (and model/) remain
            shutil.rmtree(output / leftover, ignore_errors=True)
    return TrialResult(summary=summary, loaded=ctx.loaded, masks=masks)


prune_model = run_trial  # the one-shot entry point of the pruning foundation; same code path


def _run_iteration(ctx: TrialContext, state: TrialState, index: int,
                   previous: Masks | None) -> tuple[dict[str, Any], Masks]:
    """Prune to the step's level, evaluate, recover, evaluate: one record of the history."""
    config = ctx.config
    level = state.levels[index]
    started = time.perf_counter()
    before = state.history[-1]["ppl_after_train"] if state.history else state.ppl_dense
    record: dict[str, Any] = {"iteration": index + 1, "target_sparsity": level}
    if config.is_structured:
        from .structured_trial import structured_step

        masks, structured = structured_step(ctx, state, level)
        record["layer_ratios"] = structured["layer_ratios"]
        record["structured"] = structured
    else:
        step_config = config if config.pattern.is_nm else dataclasses.replace(config, sparsity=repr(level))
        ratios = layer_ratios(ctx, state, level)
        with ctx.timer.phase("prune"):
            masks = _combine(previous, prune(ctx.loaded.adapter, step_config, ctx.calib, ctx.device, ratios))
            apply_masks(ctx.loaded.model, masks)
        if ratios is not None:
            record["layer_ratios"] = ratios
    ppl_after_prune: float | None = None
    if config.test_after_prune or config.recovery == "none":
        with ctx.timer.phase("eval_pruned"):
            ppl_after_prune = ctx.evaluate(desc=f"perplexity after pruning ({index + 1}/{len(state.levels)})")
            record["sample_after_prune"] = sample_generation(ctx)
    if config.recovery != "none":
        from .recover.training import TrainingDiverged

        try:
            with ctx.timer.phase("recover"):
                recovered = _recover(ctx, masks, index + 1, ppl_after_prune)
        except TrainingDiverged as exc:
            _record_failure(ctx, state, index, str(exc))
            raise TrialFailed(f"trial failed at iteration {index + 1}: {exc}; "
                              f"{index} finished iteration(s) kept") from None
        train = recovered.pop("train")
        if ppl_after_prune is None:  # not evaluated separately: use recovery's own baseline, if it took one
            ppl_after_prune = train.baseline_ppl
        record.update(recovered)
        record.update(train_loss=train.train_loss, steps=train.steps, epochs=[dataclasses.asdict(e) for e in train.epochs],
                      best_epoch=train.best_epoch, stopped_early=train.stopped_early)
    else:
        record["ppl_after_train"] = ppl_after_prune
    verify_masks(ctx.loaded.model, masks)
    # Structured pruning removes parameters instead of zeroing them: its sparsity is the
    # measured fraction of prunable parameters gone.
    report = measure_sparsity(ctx.loaded.adapter)
    sparsity = record["structured"]["sparsity"] if config.is_structured else report.overall
    record.update(
        sparsity=sparsity, ppl_after_prune=ppl_after_prune, ppl_before=before,
        # Parameters left that are not zero (the model size a ppl-vs-size Pareto front trades against).
        params_remaining=count_params(ctx.loaded.model) - report.zero_params,
        iterations_planned=len(state.levels),
        recovery_pct=recovery_pct(before, ppl_after_prune, record["ppl_after_train"])
        if ppl_after_prune is not None else None,
        time_s=round(time.perf_counter() - started, 3), peak_memory_mb=round(peak_memory_mb(ctx.device), 1),
    )
    logger.info("iteration %d/%d: sparsity %.4f, ppl after pruning %s, after training %.4f",
                index + 1, len(state.levels), sparsity,
                "-" if ppl_after_prune is None else f"{ppl_after_prune:.4f}", record["ppl_after_train"])
    return record, masks


def sample_generation(ctx: TrialContext, prompt_tokens: int = 16, new_tokens: int = 24) -> dict[str, str]:
    """Greedy continuation of the start of the evaluation text: shows the model still generates."""
    model, tokenizer = ctx.loaded.model, ctx.loaded.tokenizer
    prompt = ctx.eval_stream[:prompt_tokens].view(1, -1).to(ctx.device)
    new_tokens = max(1, min(new_tokens, ctx.settings.context_length - prompt.shape[1]))
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    return {"prompt": tokenizer.decode(prompt[0]), "continuation": tokenizer.decode(out[0, prompt.shape[1]:])}


def _record_failure(ctx: TrialContext, state: TrialState, index: int, reason: str) -> None:
    """Leave a failed summary beside the last good checkpoint; never write the diverged weights."""
    if not ctx.config.output:
        return
    output = Path(ctx.config.output)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / SUMMARY_FILE, {
        "status": "failed", "failed_iteration": index + 1, "error": reason, "history": state.history,
        "ppl_dense": state.ppl_dense, "config": ctx.config.to_dict(),
    })


def build_summary(ctx: TrialContext, state: TrialState) -> dict[str, Any]:
    config, settings, loaded = ctx.config, ctx.settings, ctx.loaded
    report = measure_sparsity(loaded.adapter)
    last = state.history[-1] if state.history else {}
    ppl_final = last.get("ppl_after_train", state.ppl_dense)
    # Best at the target: the final iteration's best epoch (with keep_best this is ppl_final).
    at_target = [e["ppl"] for e in last.get("epochs", []) if e.get("ppl") is not None] + [ppl_final]
    best_iteration = min(state.history, key=lambda h: h["ppl_after_train"], default=None)
    summary: dict[str, Any] = {
        "status": "completed",
        "model": config.model,
        "model_path": loaded.path,
        "family": loaded.adapter.family,
        "method": config.method,
        "pattern": "structured" if config.is_structured else config.pattern.label,
        "schedule": config.schedule,
        "recovery": config.recovery,
        "sparsity_target": config.target_ratio,
        "sparsity_measured": last["sparsity"] if config.is_structured and last else report.overall,
        "iterations": len(state.history),
        "ppl_dense": state.ppl_dense,
        "ppl_pruned": last.get("ppl_after_prune", state.ppl_dense),
        "sample_after_prune": last.get("sample_after_prune"),
        "ppl_final": ppl_final,
        "ppl_best": min(at_target),
        "best_iteration": {k: best_iteration[k] for k in ("iteration", "sparsity", "ppl_after_train")}
        if best_iteration else None,
        "ppl_change_pct": 100.0 * (ppl_final - state.ppl_dense) / state.ppl_dense,
        "history": state.history,
        "per_layer": report.to_dict()["per_layer"],
        "per_weight": report.per_weight,
        "params_prunable": report.total_params,
        "params_zero": report.zero_params,
        "timings_s": ctx.timer.seconds,
        "peak_memory_mb": round(peak_memory_mb(ctx.device), 1),
        "protocol": {
            "eval_data": resolve_source(settings.eval_data, "evaluation").describe(),
            "eval_seqlen": settings.eval_seqlen,
            "eval_stride": settings.eval_stride,
            "eval_windows": len(window_starts(ctx.eval_stream.numel(), settings.eval_seqlen, settings.eval_stride,
                                              config.eval_max_windows)),
            "calib_data": resolve_source(settings.calib_data, "calibration").describe()
            if ctx.calib is not None or ctx.taylor_windows is not None else None,
            "nsamples": config.nsamples if ctx.calib is not None else 0,
            "taylor_examples": config.num_examples if ctx.taylor_windows is not None else 0,
            "taylor_seqlen": settings.taylor_seqlen if ctx.taylor_windows is not None else None,
            "seqlen": settings.seqlen,
            "train_data": resolve_source(settings.train_data, "calibration").describe()
            if ctx.train_windows is not None else None,
            "train_samples": config.train_samples if ctx.train_windows is not None else 0,
            "train_seqlen": settings.train_seqlen,
            "seed": config.seed,
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            "device": str(ctx.device),
            "context_length": settings.context_length,
        },
        "stats_cache": ctx.cache.events if ctx.cache is not None else None,
        "layer_importance": state.layer_importance,
        "structured": last.get("structured"),
        "versions": {"raysparse": __version__, "torch": torch.__version__, "transformers": _transformers_version()},
        "config": config.to_dict(),
    }
    return summary


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


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
        if summary.get("layer_importance"):  # reusable with --importance-config
            write_json_atomic(output / "layer_importance.json", summary["layer_importance"])
        write_json_atomic(output / SUMMARY_FILE, summary)
    except BaseException:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
