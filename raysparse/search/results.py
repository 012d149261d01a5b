"""What a finished search leaves: the results table, the best configuration, the Pareto set."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raysparse.errors import RaysparseError
from raysparse.search.plots import export_study, write_plots
from raysparse.search.settings import BEST_CONFIG_FILE, OBJECTIVES, RESULTS_CSV, RESULTS_PARQUET, SearchSettings
from raysparse.search.space import SearchSpace

# Tune's statuses of a trial that had not ended when the search was interrupted.
_UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def _trial_status(result, target: float, tune_status: str | None = None) -> str:
    if result.error is not None:
        return "error"
    metrics = result.metrics or {}
    if metrics.get("completed"):
        return "completed"
    if tune_status in _UNFINISHED:
        return "interrupted"  # the search was stopped (Ctrl-C) while it ran: --resume continues it
    return "stopped"  # cut by the early-stopping scheduler before reaching the target


def _live_study(searcher):
    """The searcher's in-memory Optuna study (fresh runs; a restored Tuner keeps its own copy)."""
    inner = getattr(searcher, "searcher", searcher)
    return getattr(inner, "_ot_study", None)


def summarise_results(grid, space: SearchSpace, settings: SearchSettings, experiment: Path,
                      study=None, statuses: list[str] | None = None) -> dict[str, Any]:
    """One row per trial (config, metrics, status, error) as CSV + Parquet; the best config as JSON.

    `statuses`: Tune's status of each trial (in the grid's order) after an interrupt, so the
    trials it cut read `interrupted`, not `stopped`.
    """

    metrics_names, modes = OBJECTIVES[settings.objective]
    rows = []
    histories: dict[str, list[dict[str, Any]]] = {}
    for index, result in enumerate(grid):
        metrics = result.metrics or {}
        params = {k: v for k, v in (result.config or {}).items() if k in space.params}
        try:
            target = space.sample_config(result.config or {}).target_ratio
        except RaysparseError:
            target = float("nan")
        row = {
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "status": _trial_status(result, target, statuses[index] if statuses else None),
            "error": error_reason(result.error) if result.error else None,
            **{f"param_{k}": v for k, v in params.items()},
            **{k: metrics.get(k) for k in ("val_ppl", "val_ppl_dense", "val_zeroshot_acc", "val_zeroshot_acc_dense",
                                            "sparsity", "iteration",
                                            "train_steps_total", "wall_s_total", "params_remaining",
                                            "ppl_after_prune", "recovery_pct", "node_id", "attempt",
                                            "resumed_after")},
            "path": result.path,
        }
        rows.append(row)
        frame = result.metrics_dataframe
        if frame is not None and "replayed" in frame:  # a resumed trial's replayed reports, once is enough
            frame = frame[frame["replayed"].isna() | (frame["replayed"] == False)]  # noqa: E712 - pandas
        if frame is not None and "sparsity" in frame:
            histories[row["trial_id"]] = frame[["sparsity", "val_ppl"]].dropna().to_dict("records")
    write_tables(rows, experiment)

    completed = [r for r in rows if r["status"] == "completed" and all(r.get(m) is not None for m in metrics_names)]
    best = best_row(completed, metrics_names[0], modes[0])
    pareto = pareto_front(completed, metrics_names, modes) if len(metrics_names) > 1 else None
    best_config_path = None
    if best is not None:
        best_params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_")}
        config = space.sample_config(best_params).to_dict()
        config["output"] = None
        best_config_path = experiment / BEST_CONFIG_FILE
        best_config_path.write_text(json.dumps(config, indent=2))

    plots = write_plots(experiment, histories, rows, study)
    study_url = export_study(study, experiment) if study is not None else None
    return {"experiment": str(experiment), "rows": rows, "best": best, "pareto": pareto,
            "best_config": str(best_config_path) if best_config_path else None, "plots": plots,
            "optuna_storage": study_url, "pareto_metrics": metrics_names}


def write_tables(rows: list[dict[str, Any]], experiment: Path) -> None:
    """results.csv and results.parquet: one row per trial, trial id and status first."""
    columns = sorted({k for row in rows for k in row}, key=lambda k: (not k.startswith(("trial", "status")), k))
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    pq.write_table(table, experiment / RESULTS_PARQUET)
    pacsv.write_csv(table, experiment / RESULTS_CSV)


def error_reason(error: BaseException) -> str:
    """The user-facing reason of a failed trial: the last line of Ray's wrapped traceback."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def best_row(rows: list[dict[str, Any]], metric: str, mode: str = "min") -> dict[str, Any] | None:
    """The row with the lowest (mode min) or highest (max) value of `metric`.

    Ties (two schedules reaching the same weights) go to the parameters that sort first, not
    to the row order, which a resumed search changes.
    """
    if not rows:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(rows, key=lambda r: (sign * r[metric], json.dumps(
        {k: v for k, v in r.items() if k.startswith("param_")}, sort_keys=True, default=str)))


def pareto_front(rows: list[dict[str, Any]], metrics: list[str],
                 modes: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows not dominated on every metric (minimised, or maximised where its mode is max)."""
    signs = {m: -1.0 if mode == "max" else 1.0 for m, mode in zip(metrics, modes or ["min"] * len(metrics))}

    def dominates(a, b):
        return (all(signs[m] * a[m] <= signs[m] * b[m] for m in metrics)
                and any(signs[m] * a[m] < signs[m] * b[m] for m in metrics))

    return [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'trial':<16} {'status':<10} {'val_ppl':>10} {'sparsity':>8}  params  "
             "(validation perplexity, what the search decides on; stopped = cut early by ASHA at a rung (a "
             "sparsity milestone, or a recovery epoch with --fidelity epochs), its ppl is from there; "
             "interrupted = cut by Ctrl-C, --resume continues it)"]
    order = {"completed": 0, "stopped": 1, "interrupted": 2, "error": 3}  # a stopped trial's ppl is at a lower sparsity
    for row in sorted(report["rows"], key=lambda r: (order.get(r["status"], 4), r["val_ppl"] is None,
                                                     r["val_ppl"] or 0)):
        params = " ".join(f"{k[6:]}={_fmt(v)}" for k, v in row.items() if k.startswith("param_"))
        ppl = f"{row['val_ppl']:.4f}" if row["val_ppl"] is not None else "-"
        sparsity = f"{row['sparsity']:.4f}" if row["sparsity"] is not None else "-"
        lines.append(f"{row['trial_id']:<16} {row['status']:<10} {ppl:>10} {sparsity:>8}  {params}"
                     + (f"  error: {row['error']}" if row["error"] else ""))
    if report["best"]:
        best = report["best"]
        acc = (f" val_zeroshot_acc {100 * best['val_zeroshot_acc']:.2f}%"
               if best.get("val_zeroshot_acc") is not None else "")
        lines.append(f"best (chosen on validation): {best['trial_id']} val_ppl {best['val_ppl']:.4f}{acc}")
        for entry in report.get("final_eval") or []:
            runs = entry["runs"]
            spread = f" ± {entry['test_ppl_std']:.4f} (std over {len(runs)} calibration seeds)" \
                if entry.get("test_ppl_std") is not None else " (1 seed; --final-seeds K for the spread)"
            lines.append(f"test ppl (reported, never used to choose): {entry['trial_id']} "
                         f"{entry['test_ppl_mean']:.4f}{spread}; dense {runs[0]['test_ppl_dense']:.4f}")
        lines.append(f"best config: {report['best_config']}  (re-run: python launch/prune.py --config {report['best_config']})")
    else:
        lines.append("no trial completed")
    if report.get("pareto"):
        names = report.get("pareto_metrics") or ["val_ppl", "train_steps_total"]
        lines.append(f"pareto set ({' vs '.join(names)}): " + ", ".join(
            f"{r['trial_id']} (" + ", ".join(_fmt(r[name]) for name in names) + ")" for r in report["pareto"]))
    lines.append(f"results: {report['experiment']}/{RESULTS_CSV} and {RESULTS_PARQUET}"
                 + (f" (local copy: {report['local_copy']})" if report.get("local_copy") else ""))
    if report.get("cache"):
        lines.extend(format_cache(report["cache"]))
    if report.get("plots"):
        lines.append("plots: " + ", ".join(Path(p).name for p in report["plots"]))
    if report.get("optuna_storage"):
        lines.append(f"optuna study: optuna-dashboard {report['optuna_storage']}")
    return "\n".join(lines)


def format_cache(cache: dict[str, Any]) -> list[str]:
    """Per kind: computed vs served and the seconds saved; then what the object store held."""
    lines = [f"cache: {cache['misses']} computed, {cache['hits']} served, {cache['saved_s']:.1f}s saved "
             f"(storage {cache.get('storage')})"]
    for kind, stats in (cache.get("by_kind") or {}).items():
        lines.append(f"  {kind:<17} computed {stats['computed']:>3} ({stats['compute_s']:.1f}s)  served "
                     f"{stats['served']:>3} ({stats['read_from_storage']} read from storage)  saved "
                     f"{stats['saved_s']:.1f}s" + (f"  rejected {stats['rejected']}" if stats.get("rejected") else ""))
    memory = cache.get("memory")
    if memory:
        lines.append(f"  object store: {memory['peak_bytes'] / 2**20:.1f} MiB at peak of a "
                     f"{memory['limit_bytes'] / 2**20:.0f} MiB cap (--cache-memory), {memory['evicted']} evicted, "
                     f"{memory['not_held']} too large to hold")
    if cache.get("leases_expired"):
        lines.append(f"  {cache['leases_expired']} claim(s) of trials that died were released and computed again")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
