"""The test perplexity of what a search chose, measured once the choice is made.

A search decides on validation text only; its trials never evaluate the test text. When it
ends, the chosen configuration (and each member of a Pareto set) is run again as a plain
trial with the test text reported, under `final_seeds` calibration seeds: seed 0 (the
configuration's own seed) re-runs the chosen trial exactly, so its validation perplexity
must match the search's, and further seeds show whether a difference between two
configurations is larger than the noise of the calibration draw. Nothing measured here is
fed back to the searcher: the search is over.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from raysparse.search.results import write_tables
from raysparse.search.settings import SearchSettings
from raysparse.search.space import SearchSpace
from raysparse.trial.runner import run_trial

logger = logging.getLogger(__name__)

FINAL_EVAL_FILE = "final_eval.json"


def _evaluate(config_dict: dict[str, Any]) -> dict[str, Any]:
    """One re-run with the test text reported (runs in a Ray task)."""
    summary = run_trial(config_dict).summary
    zeroshot = summary.get("zeroshot") or {}
    return {"seed": config_dict["seed"], "val_ppl": summary["val"]["ppl_final"], "test_ppl": summary["ppl_final"],
            "test_ppl_dense": summary["ppl_dense"], "val_ppl_dense": summary["val"]["ppl_dense"],
            # lm-eval: the test split here (the search decided on the validation split)
            "val_zeroshot_acc": (zeroshot.get("val") or {}).get("acc_final"),
            "test_zeroshot_acc": zeroshot.get("acc_final"), "test_zeroshot_acc_dense": zeroshot.get("acc_dense"),
            "test_zeroshot": zeroshot.get("test_final")}


def chosen_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The best row, then the Pareto members that are not it."""
    chosen = [report["best"]] if report.get("best") else []
    for row in report.get("pareto") or []:
        if all(row is not other for other in chosen):
            chosen.append(row)
    return chosen


def evaluate_chosen(report: dict[str, Any], space: SearchSpace, settings: SearchSettings,
                    experiment: Path, stats_cache: str | None) -> list[dict[str, Any]]:
    """Re-run the chosen configurations on the test text; add test columns to their rows."""
    import ray

    chosen = chosen_rows(report)
    if not chosen or not settings.final_eval:
        return []
    run = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial,
                     resources={settings.driver_resource: 1} if settings.driver_resource else None)(_evaluate)
    jobs = []
    for row in chosen:
        params = {k[len("param_"):]: v for k, v in row.items() if k.startswith("param_")}
        config = space.sample_config(params)
        for k in range(settings.final_seeds):
            rerun = dataclasses.replace(config, seed=config.seed + k, output=None, report_test=True,
                                        stats_cache=stats_cache)
            jobs.append((row, run.remote(rerun.to_dict())))
    logger.info("evaluating %d chosen configuration(s) on the test text, %d seed(s) each",
                len(chosen), settings.final_seeds)
    results: dict[str, list[dict[str, Any]]] = {}
    for row, job in jobs:
        results.setdefault(row["trial_id"], []).append(ray.get(job))
    evaluated = []
    for row in chosen:
        runs = results[row["trial_id"]]
        tests = [r["test_ppl"] for r in runs]
        row.update(test_ppl=statistics.fmean(tests), test_ppl_std=statistics.stdev(tests) if len(tests) > 1 else None,
                   test_ppl_dense=runs[0]["test_ppl_dense"], test_seeds=len(runs),
                   val_ppl_rerun=runs[0]["val_ppl"])
        if runs[0].get("test_zeroshot_acc") is not None:
            accs = [r["test_zeroshot_acc"] for r in runs]
            row.update(test_zeroshot_acc=statistics.fmean(accs), test_zeroshot_acc_dense=runs[0]["test_zeroshot_acc_dense"],
                       val_zeroshot_acc_rerun=runs[0]["val_zeroshot_acc"])
        evaluated.append({"trial_id": row["trial_id"], "chosen_on": "validation", "val_ppl": row["val_ppl"],
                          "runs": runs, "test_ppl_mean": row["test_ppl"], "test_ppl_std": row["test_ppl_std"]})
    (experiment / FINAL_EVAL_FILE).write_text(json.dumps(evaluated, indent=2))
    write_tables(report["rows"], experiment)
    return evaluated
