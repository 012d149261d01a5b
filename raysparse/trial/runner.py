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
import logging
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from raysparse.config import TrialConfig
from raysparse.errors import RaysparseError
from raysparse.metrics.resources import PhaseTimer, peak_memory_mb
from raysparse.models.adapters import count_params
from raysparse.models.loading import LoadedModel
from raysparse.paths import write_json_atomic
from raysparse.prune import prune
from raysparse.recover.loop import TrainingDiverged
from raysparse.sparsity.masks import Masks, apply_masks, masks_from_weights, measure_sparsity, verify_masks
from raysparse.sparsity.schedule import sparsity_schedule
from raysparse.trial.checkpoint import clear_checkpoints, load_trial_state, restore_checkpoint, save_checkpoint
from raysparse.trial.context import TrialContext, _prepare
from raysparse.trial.recovery import _recover, recovery_pct
from raysparse.trial.state import RAY_TRAIN_DIR, SUMMARY_FILE, TrialState
from raysparse.trial.statistics import dense_perplexity, layer_importance
from raysparse.trial.steps import _combine, layer_ratios
from raysparse.trial.structured_step import structured_step
from raysparse.trial.summary import build_summary, write_outputs

logger = logging.getLogger(__name__)


Reporter = Callable[[dict[str, Any]], None]


class TrialFailed(RaysparseError):
    """The trial stopped (e.g. NaN loss); finished iterations are kept in the output folder."""


@dataclass
class TrialResult:
    summary: dict[str, Any]
    loaded: LoadedModel
    masks: Masks = field(repr=False, default_factory=dict)


PruneResult = TrialResult


def run_trial(config: TrialConfig | Mapping[str, Any], reporter: Reporter | None = None, *,
              node_id: str | None = None) -> TrialResult:
    """Run one trial (one-shot or iterative, with or without recovery) and return its summary.

    With an output folder, every finished iteration but the last is checkpointed there
    *before* `reporter` hears of it, so a reporter may hand that folder on
    (`checkpoint_of(output, record["iteration"])`; a search gives it to Ray Tune). Each start
    appends to the attempt log in the checkpointed state (`node_id` says where it ran), and
    each record carries the training steps and wall time summed over every start.
    """
    started = time.perf_counter()
    if not isinstance(config, TrialConfig):
        config = TrialConfig.from_dict(config)
    ctx = _prepare(config)
    output = Path(config.output) if config.output else None
    # A caller that puts distributed recovery's epoch checkpoints elsewhere (a search: on its
    # storage, for a retry on another node) owns them; otherwise they live in the output.
    own_train_dir = output / RAY_TRAIN_DIR if output and not config.ray_train_storage else None
    state = load_trial_state(output, config) if output else None
    masks: Masks | None = None
    if state is not None:
        masks = restore_checkpoint(output, ctx.loaded)
        ctx.timer = PhaseTimer(state.timings_s)
        logger.info("resuming %s after iteration %d of %d", output, state.completed, len(state.levels))
    else:
        if output:  # a fresh start: checkpoints of an earlier run must not be resumed
            clear_checkpoints(output)
            if own_train_dir is not None:
                shutil.rmtree(own_train_dir, ignore_errors=True)
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
    state.attempts.append({"attempt": len(state.attempts) + 1, "node_id": node_id, "host": socket.gethostname(),
                           "resumed_after": state.completed, "started": round(time.time(), 3)})
    spent_before = state.wall_s_total  # by earlier starts, up to the checkpoint this one resumed

    for index in range(state.completed, len(state.levels)):
        record, masks = _run_iteration(ctx, state, index, masks)
        state.train_steps_total += int(record.get("steps") or 0)
        state.wall_s_total = round(spent_before + time.perf_counter() - started, 3)
        record.update(attempt=len(state.attempts), train_steps_total=state.train_steps_total,
                      wall_s_total=state.wall_s_total)
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
    state.wall_s_total = round(spent_before + time.perf_counter() - started, 3)
    summary = build_summary(ctx, state)
    if output:
        with ctx.timer.phase("save"):
            write_outputs(output, summary, ctx.loaded, masks, save_model=config.save)
        summary["timings_s"] = ctx.timer.seconds
        write_json_atomic(output / SUMMARY_FILE, summary)
        clear_checkpoints(output)  # finished: the summary (and model/) remain
        if own_train_dir is not None:
            shutil.rmtree(own_train_dir, ignore_errors=True)
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
