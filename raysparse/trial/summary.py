"""The trial's summary.json (every number and the protocol behind it) and its saved model."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

from raysparse import __version__
from raysparse.data.sources import resolve_source
from raysparse.metrics.perplexity import window_starts
from raysparse.metrics.resources import peak_memory_mb
from raysparse.models.loading import LoadedModel
from raysparse.paths import write_json_atomic
from raysparse.sparsity.masks import Masks, measure_sparsity, save_masks
from raysparse.trial.context import TrialContext
from raysparse.trial.state import MODEL_DIR, SUMMARY_FILE, TrialState


def build_summary(ctx: TrialContext, state: TrialState, test_ppl_final: float | None = None,
                  zeroshot_test: dict[str, Any] | None = None) -> dict[str, Any]:
    """Top-level `ppl_*` are the test text's (the protocol numbers, None when not evaluated);
    `val` holds the validation numbers every decision of the trial read. `zeroshot` the same
    for lm-eval's tasks: `acc_*` from the test role, `val` from the validation role."""
    config, settings, loaded = ctx.config, ctx.settings, ctx.loaded
    report = measure_sparsity(loaded.adapter)
    last = state.history[-1] if state.history else {}
    ppl_final = last.get("ppl_after_train", state.ppl_dense)
    # Best at the target: the final iteration's best epoch (with keep_best this is ppl_final).
    at_target = [e["ppl"] for e in last.get("epochs", []) if e.get("ppl") is not None] + [ppl_final]
    best_iteration = min(state.history, key=lambda h: h["ppl_after_train"], default=None)
    test_pruned = last.get("test_ppl_after_prune") if state.history else state.test_ppl_dense
    reference = (test_ppl_final, state.test_ppl_dense) if test_ppl_final is not None else (ppl_final, state.ppl_dense)
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
        "ppl_dense": state.test_ppl_dense,
        "ppl_pruned": test_pruned,
        "ppl_final": test_ppl_final,
        "val": {"ppl_dense": state.ppl_dense, "ppl_pruned": last.get("ppl_after_prune", state.ppl_dense),
                "ppl_final": ppl_final, "ppl_best": min(at_target)},
        "sample_after_prune": last.get("sample_after_prune"),
        "zeroshot": zeroshot_summary(state, last, zeroshot_test) if ctx.tasks is not None else None,
        "best_iteration": {k: best_iteration[k] for k in ("iteration", "sparsity", "ppl_after_train")}
        if best_iteration else None,
        "ppl_change_pct": 100.0 * (reference[0] - reference[1]) / reference[1],
        "history": state.history,
        "per_layer": report.to_dict()["per_layer"],
        "per_weight": report.per_weight,
        "params_prunable": report.total_params,
        "params_zero": report.zero_params,
        "timings_s": ctx.timer.seconds,
        # Summed over every start of the trial (a resumed run costs what it cost in all).
        "train_steps_total": state.train_steps_total,
        "wall_s_total": state.wall_s_total,
        "attempts": state.attempts,
        "peak_memory_mb": round(peak_memory_mb(ctx.device), 1),
        "protocol": {
            "eval_data": resolve_source(settings.eval_data, "test").describe(),
            "val_data": resolve_source(settings.val_data, "validation").describe() if settings.val_data
            else "none (no decisions: per-iteration numbers are on the test text)",
            "test_reported": config.report_test,
            "eval_seqlen": settings.eval_seqlen,
            "eval_stride": settings.eval_stride,
            "eval_windows": len(window_starts(ctx.test_stream.numel(), settings.eval_seqlen, settings.eval_stride,
                                              config.eval_max_windows, config.eval_max_tokens)),
            "val_windows": len(window_starts(ctx.val_stream.numel(), settings.eval_seqlen, settings.eval_stride,
                                             config.eval_max_windows, config.eval_max_tokens)),
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
            "zeroshot": ctx.tasks_protocol,
        },
        "stats_cache": ctx.cache.events if ctx.cache is not None else None,
        # Per kind of cached value: hits, computations and the seconds they cost or saved.
        "stats_cache_by_kind": ctx.cache.by_kind() if ctx.cache is not None else None,
        "layer_importance": state.layer_importance,
        "structured": last.get("structured"),
        "versions": {"raysparse": __version__, "torch": torch.__version__, "transformers": _transformers_version()},
        "config": config.to_dict(),
    }
    return summary


def zeroshot_summary(state: TrialState, last: dict[str, Any], test: dict[str, Any] | None) -> dict[str, Any]:
    """Dense and final lm-eval results by role; the top-level means are the test role's when it ran."""
    dense = state.zeroshot_dense or {}
    val = {"dense": dense.get("validation"), "final": last.get("zeroshot", dense.get("validation"))}
    test_dense = dense.get("test")
    return {"acc_dense": (test_dense or {}).get("mean_acc"), "acc_final": (test or {}).get("mean_acc"),
            "val": {"acc_dense": (val["dense"] or {}).get("mean_acc"), "acc_final": (val["final"] or {}).get("mean_acc")},
            "test_dense": test_dense, "test_final": test, "val_dense": val["dense"], "val_final": val["final"]}


def _transformers_version() -> str:
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
