"""Plots and the Optuna study export of a finished search.

Plots are PNG files beside the results table so they can be looked at on a headless
cluster; the study is copied into SQLite so `optuna-dashboard sqlite:///.../optuna.db`
opens it (the live study stays in memory because RDB storage breaks Tuner.restore).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"


def write_plots(experiment: Path, histories: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]],
                study=None) -> list[str]:
    """ppl vs sparsity per trial, objective vs trial, and (with >= 3 finished trials) parameter importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, history in histories.items():
        points = [(h["sparsity"], h["val_ppl"]) for h in history if h.get("sparsity") is not None]
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=trial_id)
    ax.set_xlabel("sparsity (measured)")
    ax.set_ylabel("perplexity after recovery")
    ax.set_yscale("log")
    ax.set_title("perplexity vs sparsity, per trial")
    if len(histories) <= 12:
        ax.legend(fontsize=7)
    written.append(_save(fig, experiment / "ppl_vs_sparsity.png"))

    finished = [r for r in rows if r.get("val_ppl") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"completed": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    for index, row in enumerate(rows):
        if row.get("val_ppl") is not None:
            ax.scatter(index, row["val_ppl"], color=colors.get(row["status"], "gray"))
    completed = [(i, r["val_ppl"]) for i, r in enumerate(rows) if r["status"] == "completed" and r.get("val_ppl")]
    if completed:
        best, xs, ys = float("inf"), [], []
        for i, value in completed:
            best = min(best, value)
            xs.append(i)
            ys.append(best)
        ax.step(xs, ys, where="post", color="black", label="best completed so far")
        ax.legend()
    ax.set_xlabel("trial (creation order)")
    ax.set_ylabel("final perplexity (orange: stopped early at a milestone)")
    ax.set_title("objective vs trial")
    written.append(_save(fig, experiment / "objective_vs_trial.png"))

    if study is not None and len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 3 and finished:
        try:
            import optuna

            importances = optuna.importance.get_param_importances(study)
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ax.barh(list(importances)[::-1], list(importances.values())[::-1])
            ax.set_xlabel("importance (Optuna default evaluator)")
            ax.set_title("parameter importance")
            written.append(_save(fig, experiment / "param_importance.png"))
        except Exception as exc:  # noqa: BLE001 - importance needs varied params; never lose results for it
            logger.warning("parameter importance not plotted: %s", exc)
    plt.close("all")
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def export_study(study, experiment: Path) -> str | None:
    """Copy the in-memory study's finished trials into SQLite for optuna-dashboard."""
    import optuna

    url = f"sqlite:///{experiment / OPTUNA_DB}"
    try:
        target = optuna.create_study(storage=url, study_name=experiment.name, directions=study.directions,
                                     load_if_exists=True)
        known = len(target.trials)
        target.add_trials([t for t in study.trials if t.state.is_finished()][known:])
    except Exception as exc:  # noqa: BLE001 - an export problem must not lose the search
        logger.warning("could not export the Optuna study: %s", exc)
        return None
    return url
