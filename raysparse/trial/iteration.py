"""One iteration of a trial: prune to the level, evaluate, recover, evaluate, verify.

The same sequence for every kind of pruning: what differs is the `PruneStep` (zeroing
weights, or removing units), chosen once from the config. The returned record is one entry
of the trial's history and one report to a search.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from raysparse.config import TrialConfig
from raysparse.errors import RaysparseError
from raysparse.metrics.resources import peak_memory_mb
from raysparse.models.adapters import count_params
from raysparse.paths import write_json_atomic
from raysparse.recover.loop import EpochRecord, TrainingDiverged
from raysparse.sparsity.masks import Masks, measure_sparsity, verify_masks
from raysparse.trial.context import TrialContext
from raysparse.trial.projection import projected_perplexity
from raysparse.trial.recovery import _recover, recovery_pct
from raysparse.trial.state import SUMMARY_FILE, TrialState
from raysparse.trial.steps import PruneStep
from raysparse.trial.structured_step import StructuredStep
from raysparse.trial.unstructured_step import UnstructuredStep

logger = logging.getLogger(__name__)


class TrialFailed(RaysparseError):
    """The trial stopped (e.g. NaN loss); finished iterations are kept in the output folder."""


def step_for(config: TrialConfig) -> PruneStep:
    """The pruning step a config asks for: structural removal, or masks."""
    return StructuredStep() if config.is_structured else UnstructuredStep()


def run_iteration(ctx: TrialContext, state: TrialState, index: int,
                   previous: Masks | None) -> tuple[dict[str, Any], Masks]:
    """Prune to the step's level, evaluate, recover, evaluate: one record of the history."""
    config = ctx.config
    level = state.levels[index]
    started = time.perf_counter()
    before = state.history[-1]["ppl_after_train"] if state.history else state.ppl_dense
    # Where this iteration starts from (level, validation ppl): a search interpolates between
    # the two points to compare trials at equal sparsity (raysparse.search.milestones).
    record: dict[str, Any] = {"iteration": index + 1, "target_sparsity": level, "ppl_before": before,
                              "sparsity_before": state.levels[index - 1] if index else state.start_sparsity}
    step = step_for(config)
    outcome = step.prune(ctx, state, level, previous)
    masks = outcome.masks
    record.update(outcome.record)
    ppl_after_prune: float | None = None
    if config.test_after_prune or config.recovery == "none":
        with ctx.timer.phase("eval_pruned"):
            ppl_after_prune = ctx.evaluate(desc=f"perplexity after pruning ({index + 1}/{len(state.levels)})")
            record["sample_after_prune"] = sample_generation(ctx)
            if config.report_test and index + 1 == len(state.levels):  # the reported "pruned" number
                record["test_ppl_after_prune"] = ctx.evaluate_test(desc="test perplexity after pruning")
    epochs_before = sum(len(r.get("epochs") or ()) for r in state.history)
    if config.recovery != "none":
        on_epoch = _epoch_reports(ctx, state, record, step.sparsity(ctx, outcome), ppl_after_prune, epochs_before) \
            if ctx.on_epoch is not None else None
        try:
            with ctx.timer.phase("recover"):
                recovered = _recover(ctx, masks, index + 1, ppl_after_prune, on_epoch)
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
    record.update(recovery_epochs_total=epochs_before + len(record.get("epochs") or ()),
                  recovery_epochs_before=epochs_before)
    verify_masks(ctx.loaded.model, masks)
    if config.project_to_target:
        if index + 1 < len(state.levels):
            with ctx.timer.phase("projection"):
                record["ppl_projected"] = projected_perplexity(ctx, state, step, masks)
            verify_masks(ctx.loaded.model, masks)
        # The previous point on the same curve, for interpolating to a rung (None: the first iteration).
        record["ppl_projected_before"] = state.history[-1].get("ppl_projected") if state.history else None
    if ctx.tasks is not None:  # every iteration: a search may rank trials by it at each milestone
        with ctx.timer.phase("zeroshot"):
            record["zeroshot"] = ctx.zeroshot("validation", desc=f"zero-shot ({index + 1}/{len(state.levels)})")
        record["val_zeroshot_acc"] = record["zeroshot"]["mean_acc"]
    report = measure_sparsity(ctx.loaded.adapter)
    sparsity = step.sparsity(ctx, outcome)
    record.update(
        sparsity=sparsity, ppl_after_prune=ppl_after_prune, ppl_before=before,
        # Parameters left that are not zero (the model size a ppl-vs-size Pareto front trades against).
        params_remaining=count_params(ctx.loaded.model) - report.zero_params,
        params_total=count_params(ctx.loaded.model),  # after any shrinking; what --plan scales by
        iterations_planned=len(state.levels),
        recovery_pct=recovery_pct(before, ppl_after_prune, record["ppl_after_train"])
        if ppl_after_prune is not None else None,
        time_s=round(time.perf_counter() - started, 3), peak_memory_mb=round(peak_memory_mb(ctx.device), 1),
    )
    logger.info("iteration %d/%d: sparsity %.4f, ppl after pruning %s, after training %.4f",
                index + 1, len(state.levels), sparsity,
                "-" if ppl_after_prune is None else f"{ppl_after_prune:.4f}", record["ppl_after_train"])
    return record, masks


def _epoch_reports(ctx: TrialContext, state: TrialState, record: dict[str, Any], sparsity: float,
                   ppl_after_prune: float | None, epochs_before: int) -> Callable[[EpochRecord], None]:
    """The recovery's per-epoch hook: a partial record for `ctx.on_epoch` after every epoch.

    Its ppl is what the trial would end with if it stopped here: the best epoch so far (and
    the pruned model, which keep-best can also return to), or the last epoch without keep-best.
    """
    config, best, steps = ctx.config, [ppl_after_prune], [0]

    def report(epoch: EpochRecord) -> None:
        steps[0] += epoch.steps
        if epoch.ppl is None:
            return  # no evaluation, nothing to compare
        current = epoch.ppl
        if config.keep_best:
            best[0] = min(v for v in (best[0], epoch.ppl) if v is not None)
            current = best[0]
        ctx.on_epoch({**record, "partial": True, "epoch": epoch.epoch, "sparsity": sparsity,
                      "ppl_after_prune": ppl_after_prune, "ppl_after_train": current,
                      "iterations_planned": len(state.levels), "train_steps_total": state.train_steps_total + steps[0],
                      "recovery_epochs_total": epochs_before + epoch.epoch,
                      "recovery_epochs_before": epochs_before + epoch.epoch - 1})
    return report


def sample_generation(ctx: TrialContext, prompt_tokens: int = 16, new_tokens: int = 24) -> dict[str, str]:
    """Greedy continuation of the start of the evaluation text: shows the model still generates."""
    model, tokenizer = ctx.loaded.model, ctx.loaded.tokenizer
    prompt = ctx.val_stream[:prompt_tokens].view(1, -1).to(ctx.device)
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
