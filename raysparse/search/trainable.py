"""The Tune function trainable: one raysparse trial, reported after every finished iteration."""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raysparse.cluster.storage import delete_dir, join
from raysparse.config import TrialConfig
from raysparse.search.milestones import (
    BEFORE_PCT,
    BEFORE_VALUE,
    PROJECTED,
    RECOVERY_EPOCH,
    RECOVERY_EPOCH_BEFORE,
    before_key,
)
from raysparse.search.resume import finished_in, finished_on_storage, last_attempt, restore_into
from raysparse.search.space import SearchSpace
from raysparse.trial.checkpoint import checkpoint_of
from raysparse.trial.runner import run_trial
from raysparse.trial.state import RAY_TRAIN_DIR

logger = logging.getLogger(__name__)


def _trial_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """What each Tune report carries: the objective on every report (strict metric checking)."""
    return {
        "val_ppl": float(record["ppl_after_train"]),  # validation text: what the searcher and ASHA decide on
        # With project_to_target: below the target, the ppl of the model pruned one-shot to the
        # target (what --rung-metric projected ranks by); at the target, the trial's own value.
        PROJECTED: float(record.get("ppl_projected") or record["ppl_after_train"]),
        before_key(PROJECTED): None if record.get("ppl_projected_before") is None
        else float(record["ppl_projected_before"]),
        "ppl_after_prune": None if record.get("ppl_after_prune") is None else float(record["ppl_after_prune"]),
        "sparsity": float(record["sparsity"]),
        # lm-eval's mean accuracy on the validation split (None without eval_tasks)
        "val_zeroshot_acc": None if record.get("val_zeroshot_acc") is None else float(record["val_zeroshot_acc"]),
        # The milestone is the planned level, not the measured one: a trial whose per-row
        # rounding lands on 79.72% for an 80% target still reaches the 80% rung.
        "sparsity_pct": int(math.floor(100 * float(record.get("target_sparsity", record["sparsity"])) + 1e-6)),
        # The point this iteration started from: ASHA and Optuna interpolate to their rungs.
        BEFORE_PCT: int(math.floor(100 * float(record.get("sparsity_before") or 0.0) + 1e-6)),
        BEFORE_VALUE: None if record.get("ppl_before") is None else float(record["ppl_before"]),
        "iteration": int(record["iteration"]),
        # Recovery epochs trained so far (--fidelity epochs: ASHA's rungs), and before this report.
        RECOVERY_EPOCH: int(record.get("recovery_epochs_total") or 0),
        RECOVERY_EPOCH_BEFORE: int(record.get("recovery_epochs_before") or 0),
        # Summed over every start of the trial: a retried trial costs what it cost in all.
        "train_steps_total": int(record.get("train_steps_total") or 0),
        "wall_s_total": record.get("wall_s_total"),
        "recovery_pct": record.get("recovery_pct"),
        "params_remaining": record.get("params_remaining"),
        # The last schedule step finished the trial's work: if the scheduler stops it at this
        # report (a one-shot trial at its only milestone), it still counts as completed.
        # An epoch report (partial) never does: the trial's summary is still to come.
        "completed": not record.get("partial") and record.get("iterations_planned") is not None
        and int(record["iteration"]) >= int(record["iterations_planned"]),
    }


def _final_metrics(summary: dict[str, Any], placement: dict[str, Any]) -> dict[str, Any]:
    final = _trial_metrics(summary["history"][-1])
    zeroshot = summary.get("zeroshot") or {}
    final.update(val_ppl_dense=summary["val"]["ppl_dense"], completed=True,
                 val_zeroshot_acc_dense=(zeroshot.get("val") or {}).get("acc_dense"), iterations=summary["iterations"],
                 **placement)
    if summary.get("wall_s_total") is not None:  # up to the summary, past the last iteration
        final["wall_s_total"] = summary["wall_s_total"]
    return final


def search_trainable(params: dict[str, Any], space: SearchSpace, experiment: str,
                     stats_cache: str | None = None, project: bool = False, epoch_reports: bool = False) -> None:
    """Tune function trainable: one raysparse trial, resumable through Tune's checkpoints.

    The trial works in a node-local scratch folder; after every finished iteration it
    reports that iteration's checkpoint (written there by `run_trial`) with `tune.report`,
    and Tune copies it to the trial's folder on the search's storage (`experiment`, a path
    or a URI). A retry, on whichever node, installs `tune.get_checkpoint()` locally and
    continues after the iteration it holds. The final report carries the finished output
    (summary.json, and model/ with `save`) as its checkpoint; a trial that had already
    finished is replayed from that summary instead of run again. Distributed recovery keeps
    its epoch checkpoints in `<trial folder>/ray_train` on storage, where a retry finds them.
    With `epoch_reports` (--fidelity epochs) it also reports after every recovery epoch,
    without a checkpoint: a retried one-shot trial starts over, and ASHA ignores the rungs
    it repeats.
    """
    from ray import tune

    name = Path(tune.get_context().get_trial_dir()).name  # the trial's folder name, here and on storage
    # Not Tune's trial folder: on the driver's node the driver syncs that one to storage,
    # which would upload the working checkpoints a second time (and leave them there).
    output = Path(tempfile.gettempdir()) / "raysparse-trials" / name
    shutil.rmtree(output, ignore_errors=True)  # resume from Tune's checkpoint, never a stale leftover
    # report_test off: a search's trials never look at the test text; run_search evaluates the
    # configurations it chose on it once the search is over.
    sampled = space.sample_config(params)
    # project: --rung-metric projected, whose value each report must carry (project_to_target;
    # a one-shot trial's only report is at its target, where the projection is its own value).
    config = dataclasses.replace(sampled, output=str(output), resume=True, report_test=False,
                                 project_to_target=sampled.project_to_target
                                 or (project and sampled.schedule == "iterative"),
                                 stats_cache=stats_cache, ray_train_storage=join(experiment, name, RAY_TRAIN_DIR))
    try:
        _run(config, output, join(experiment, name), epoch_reports)
    finally:
        shutil.rmtree(output, ignore_errors=True)  # what is worth keeping went to storage with a report


def _run(config: TrialConfig, output: Path, trial_uri: str, epoch_reports: bool = False) -> None:
    import ray
    from ray import tune

    checkpoint = tune.get_checkpoint()
    summary = finished_in(checkpoint, config) or finished_on_storage(trial_uri, config)
    if summary is not None:  # finished before a driver kill: replay its reports, do not re-run
        placement = last_attempt(summary)
        for record in summary["history"]:
            tune.report({**_trial_metrics(record), **placement})
        tune.report(_final_metrics(summary, placement))
        return
    node_id = ray.get_runtime_context().get_node_id()
    restored = restore_into(checkpoint, output)
    # Placement and attempt (> 1: Tune retried it after a failure; resumed_after: from which iteration).
    placement = {"attempt": len(restored.attempts) + 1 if restored else 1, "node_id": node_id,
                 "resumed_after": restored.completed if restored else 0}
    if restored is not None:
        logger.info("trial %s: attempt %d on node %s, resuming after iteration %d", output.name,
                    placement["attempt"], node_id[:12], restored.completed)
        # Replay the iterations the checkpoint holds, so the scheduler and the searcher see this
        # trial's whole sequence of milestones, as in an uninterrupted run. A search restored
        # after a driver kill starts with empty ASHA rungs: without the replay the first
        # milestones were never recorded and the later reports landed on the wrong rungs. A
        # scheduler that saw them already (a retry in the same run) ignores a repeated rung.
        for record in restored.history:
            tune.report({**_trial_metrics(record), **placement, "replayed": True})

    def report(record: dict[str, Any]) -> None:
        folder = checkpoint_of(output, int(record["iteration"]))  # None for the last iteration
        tune.report({**_trial_metrics(record), **placement},
                    checkpoint=tune.Checkpoint.from_directory(str(folder)) if folder else None)

    def report_epoch(record: dict[str, Any]) -> None:
        tune.report({**_trial_metrics(record), **placement})

    summary = run_trial(config, reporter=report, node_id=node_id,
                        epoch_reporter=report_epoch if epoch_reports else None).summary
    tune.report(_final_metrics(summary, placement), checkpoint=tune.Checkpoint.from_directory(str(output)))
    delete_dir(config.ray_train_storage)  # the epoch checkpoints of a finished trial are not needed again
