"""The Tune function trainable: one raysparse trial, reported after every finished iteration."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from raysparse.cluster.storage import download_dir, join, mirror_dir
from raysparse.search.attempts import finished_summary, last_attempt, record_attempt
from raysparse.search.space import SearchSpace
from raysparse.trial.runner import run_trial


def _trial_metrics(record: dict[str, Any], steps_so_far: int) -> dict[str, Any]:
    """What each Tune report carries: the objective on every report (strict metric checking)."""
    return {
        "final_ppl": float(record["ppl_after_train"]),
        "ppl_after_prune": None if record.get("ppl_after_prune") is None else float(record["ppl_after_prune"]),
        "sparsity": float(record["sparsity"]),
        "sparsity_pct": int(math.floor(100 * record["sparsity"] + 1e-6)),
        "iteration": int(record["iteration"]),
        "train_steps_total": int(steps_so_far),
        "recovery_pct": record.get("recovery_pct"),
        "params_remaining": record.get("params_remaining"),
        # The last schedule step finished the trial's work: if the scheduler stops it at this
        # report (a one-shot trial at its only milestone), it still counts as completed.
        "completed": record.get("iterations_planned") is not None
        and int(record["iteration"]) >= int(record["iterations_planned"]),
    }


def search_trainable(params: dict[str, Any], space: SearchSpace, stats_cache: str | None = None,
                     trials_root: str | None = None, storage_uri: str | None = None) -> None:
    """Tune function trainable: one raysparse trial, its output in `<trial folder>/trial`.

    With a filesystem storage path (`trials_root`, shared by every node in a multi-node
    run) the output goes straight to the trial's folder there, not to Tune's node-local
    staging folder (`get_trial_dir()`, synced only from the driver's node): a retry after
    a node failure, on whichever node, then finds the per-iteration checkpoint (and the
    per-epoch checkpoints of distributed recovery) and continues after the last finished
    iteration instead of starting over. With object storage (`storage_uri`) the trial works
    in the local folder and mirrors it to storage before every report, and a start on a
    node that does not have the folder yet downloads what an earlier attempt uploaded.
    """
    import ray
    from ray import tune

    config = space.sample_config(params)
    local_dir = Path(tune.get_context().get_trial_dir())
    output = (Path(trials_root) / local_dir.name if trials_root else local_dir) / "trial"
    remote_output = None
    if storage_uri:
        remote_output = join(storage_uri, local_dir.name, "trial")
        if not output.exists():
            download_dir(remote_output, output)
    config = dataclasses.replace(config, output=str(output), resume=True, stats_cache=stats_cache)
    steps = {"total": 0}
    node: dict[str, Any] = {}

    def report(record: dict[str, Any]) -> None:
        steps["total"] += int(record.get("steps") or 0)
        if remote_output:
            mirror_dir(output, remote_output)
        tune.report({**_trial_metrics(record, steps["total"]), **node})

    summary = finished_summary(output, config.to_dict())
    if summary is not None:  # finished before a driver kill: replay its reports, do not re-run
        node.update(last_attempt(output) or {})
        for record in summary["history"]:
            report(record)
    else:
        # Placement and attempt (> 1: Tune retried it after a failure; resumed_after: from which iteration).
        node.update(record_attempt(output, ray.get_runtime_context().get_node_id()))
        summary = run_trial(config, reporter=report).summary
    if remote_output:
        mirror_dir(output, remote_output)
    final = _trial_metrics(summary["history"][-1], steps["total"])
    final.update(ppl_dense=summary["ppl_dense"], completed=True, iterations=summary["iterations"], **node)
    tune.report(final)
