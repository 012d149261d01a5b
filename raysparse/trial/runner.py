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

import logging
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from raysparse.config import TrialConfig
from raysparse.metrics.resources import PhaseTimer
from raysparse.models.loading import LoadedModel
from raysparse.paths import write_json_atomic
from raysparse.sparsity.masks import Masks, masks_from_weights, measure_sparsity, verify_masks
from raysparse.sparsity.schedule import sparsity_schedule
from raysparse.trial.checkpoint import clear_checkpoints, load_trial_state, restore_checkpoint, save_checkpoint
from raysparse.trial.context import _prepare
from raysparse.trial.iteration import TrialFailed, run_iteration
from raysparse.trial.state import RAY_TRAIN_DIR, SUMMARY_FILE, TrialState
from raysparse.trial.statistics import dense_perplexity, dense_test_perplexity, dense_zeroshot, layer_importance
from raysparse.trial.summary import build_summary, write_outputs

__all__ = ["PruneResult", "Reporter", "TrialFailed", "TrialResult", "prune_model", "run_trial"]

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]


@dataclass
class TrialResult:
    summary: dict[str, Any]
    loaded: LoadedModel
    masks: Masks = field(repr=False, default_factory=dict)


PruneResult = TrialResult


def run_trial(config: TrialConfig | Mapping[str, Any], reporter: Reporter | None = None, *,
              node_id: str | None = None, epoch_reporter: Reporter | None = None) -> TrialResult:
    """Run one trial (one-shot or iterative, with or without recovery) and return its summary.

    With an output folder, every finished iteration but the last is checkpointed there
    *before* `reporter` hears of it, so a reporter may hand that folder on
    (`checkpoint_of(output, record["iteration"])`; a search gives it to Ray Tune). Each start
    appends to the attempt log in the checkpointed state (`node_id` says where it ran), and
    each record carries the training steps and wall time summed over every start.
    `epoch_reporter` hears a partial record (`partial: True`, the best validation ppl so far)
    after every recovery epoch of in-process recovery; nothing is checkpointed for it.
    """
    started = time.perf_counter()
    if not isinstance(config, TrialConfig):
        config = TrialConfig.from_dict(config)
    ctx = _prepare(config)
    ctx.on_epoch = epoch_reporter
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
            test_ppl_dense = dense_test_perplexity(ctx) if config.report_test else None
        logger.info("dense perplexity %.4f (validation)", ppl_dense)
        start = measure_sparsity(ctx.loaded.adapter).overall
        levels = sparsity_schedule(config.schedule, config.target_ratio, config.prune_percentage,
                                   start, config.max_iterations)
        state = TrialState(config=config.to_dict(), levels=levels, ppl_dense=ppl_dense, start_sparsity=start,
                           test_ppl_dense=test_ppl_dense)
        if ctx.tasks is not None:
            with ctx.timer.phase("zeroshot"):
                state.zeroshot_dense = {"validation": dense_zeroshot(ctx, "validation"),
                                        "test": dense_zeroshot(ctx, "test") if config.report_test else None}
        if config.pruning_strategy != "uniform":
            with ctx.timer.phase("importance"):
                state.layer_importance = layer_importance(ctx)
    state.attempts.append({"attempt": len(state.attempts) + 1, "node_id": node_id, "host": socket.gethostname(),
                           "resumed_after": state.completed, "started": round(time.time(), 3)})
    spent_before = state.wall_s_total  # by earlier starts, up to the checkpoint this one resumed

    for index in range(state.completed, len(state.levels)):
        record, masks = run_iteration(ctx, state, index, masks)
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
    test_ppl_final = None
    if config.report_test:
        last = state.history[-1] if state.history else {}
        if config.recovery == "none" and last.get("test_ppl_after_prune") is not None:
            test_ppl_final = last["test_ppl_after_prune"]  # nothing changed the model since
        else:
            with ctx.timer.phase("eval_test"):
                test_ppl_final = ctx.evaluate_test(desc="test perplexity (final)")
    zeroshot_test = None
    if config.report_test and ctx.tasks is not None:
        with ctx.timer.phase("zeroshot"):
            zeroshot_test = ctx.zeroshot("test", desc="zero-shot (test, final)")
    state.wall_s_total = round(spent_before + time.perf_counter() - started, 3)
    summary = build_summary(ctx, state, test_ppl_final, zeroshot_test)
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
