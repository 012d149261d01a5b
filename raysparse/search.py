"""The search: Ray Tune + Optuna over trial settings, with milestone-fair early stopping.

Every trial runs `run_trial` (the same code path as `launch/prune.py`) inside a Tune
function trainable and reports each finished pruning iteration. Early stopping compares
trials at equal *sparsity milestones* (ASHA with `sparsity_pct` as its time attribute):
an iterative trial with p=0.1 and one with p=0.3 reach 40% sparsity at different
iteration numbers, and comparing them at equal iteration counts would punish the smooth
schedule for being slow, not for being bad.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, RaysparseError
from .space import SearchSpace, load_space, parse_space

logger = logging.getLogger(__name__)

SEARCH_STATE_FILE = "raysparse_search.json"
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
BEST_CONFIG_FILE = "best_config.json"
DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "default.yaml"

# Objective name -> (metrics, modes). The first is single-objective (ASHA applies).
OBJECTIVES: dict[str, tuple[list[str], list[str]]] = {
    "final_ppl": (["final_ppl"], ["min"]),
    "ppl_vs_compute": (["final_ppl", "train_steps_total"], ["min", "min"]),
    "ppl_vs_params": (["final_ppl", "params_remaining"], ["min", "min"]),
}


@dataclass
class SearchSettings:
    """How to run a search (what to search lives in the space file)."""

    objective: str = "final_ppl"
    space: str = str(DEFAULT_SPACE)
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None
    storage: str = "runs"
    name: str | None = None
    seed: int = 0
    max_failures: int = 1
    early_stopping: bool = True
    grace_sparsity_pct: int = 20
    searcher: str = "optuna"  # or "random" (the baseline a model-based search must beat)
    # A custom resource each trial (its Train driver) also holds, e.g. "driver", which
    # cluster.yaml gives only the head node: trials then never sit on spot GPU workers.
    driver_resource: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "SearchSettings":
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective '{self.objective}': choose one of {', '.join(OBJECTIVES)}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("--num-samples and --max-concurrent must be >= 1")
        if self.cpus_per_trial <= 0:
            raise ConfigError("--cpus-per-trial must be > 0 (a Tune trial cannot hold zero CPUs; use e.g. 0.2)")
        if self.searcher not in ("optuna", "random"):
            raise ConfigError(f"unknown searcher '{self.searcher}': choose optuna or random")
        if self.driver_resource is not None and (not self.driver_resource.strip()
                                                 or self.driver_resource.lower() in ("cpu", "gpu", "memory")):
            raise ConfigError(f"--driver-resource '{self.driver_resource}' must name a custom resource, "
                              "e.g. driver (cluster.yaml gives the head node {\"driver\": 8})")
        return self


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

    from .attempts import finished_summary, last_attempt, record_attempt
    from .trial import run_trial

    config = space.sample_config(params)
    local_dir = Path(tune.get_context().get_trial_dir())
    output = (Path(trials_root) / local_dir.name if trials_root else local_dir) / "trial"
    remote_output = None
    if storage_uri:
        from .object_storage import download_dir, join, mirror_dir

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


def milestone_optuna_search_class():
    """OptunaSearch that tells Optuna a trial stopped early at a milestone was PRUNED.

    Tune reports an ASHA-stopped trial as complete with its partial value, which misleads
    TPE into treating a 55%-sparse perplexity as a final one. This override touches
    OptunaSearch's private `_ot_trials`/`_ot_study`/`_completed_trials` (pinned by a test).
    """
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class MilestoneOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and not error and not result.get("completed") and trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    return MilestoneOptunaSearch


def _make_searcher(space: SearchSpace, settings: SearchSettings):
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    OptunaSearch = milestone_optuna_search_class()

    metrics, modes = OBJECTIVES[settings.objective]
    if settings.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    elif len(metrics) > 1:
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    searcher = OptunaSearch(
        space=space.optuna_define_by_run(), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], sampler=sampler,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)


def _make_scheduler(settings: SearchSettings):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metrics, modes = OBJECTIVES[settings.objective]
    if not settings.early_stopping or len(metrics) > 1:
        return FIFOScheduler()
    # max_t above any sparsity_pct: ASHA must never cut a trial for "running out of time".
    return ASHAScheduler(time_attr="sparsity_pct", metric=metrics[0], mode=modes[0], max_t=101,
                         grace_period=settings.grace_sparsity_pct, reduction_factor=2)


def _connect(settings: SearchSettings) -> None:
    import ray

    if ray.is_initialized():
        return
    if settings.address:
        from .preflight import check_address_reachable

        check_address_reachable(settings.address)  # ray.init would hang for minutes on a dead address
    try:
        if settings.address:
            ray.init(address=settings.address, log_to_driver=False)
        else:
            ray.init(log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"cannot connect to a Ray cluster at '{settings.address}': {str(exc).splitlines()[0]} "
            "(start one with `ray start --head` or drop --address to run locally)"
        ) from None


def max_workers(space: SearchSpace) -> int:
    """The largest Ray Train worker count any trial of the space can ask for."""
    spec = space.params.get("workers")
    if spec is None:
        return int(space.fixed.get("workers", 1))
    return int(max(spec.choices) if spec.kind == "choice" else spec.high)


def _check_resources(settings: SearchSettings, space: SearchSpace) -> None:
    """Refuse before launching what could only wait forever for resources."""
    import ray

    resources = ray.cluster_resources()
    workers = max_workers(space)
    if workers > 1 and settings.cpus_per_trial + workers > resources.get("CPU", 0):
        raise ConfigError(
            f"trials with workers={workers} need {settings.cpus_per_trial:g} CPU for the trial (the Train driver) plus "
            f"{workers} for its workers, but the cluster has {resources.get('CPU', 0):g} CPUs: "
            "lower workers, use --cpus-per-trial 0.2, or add nodes"
        )
    if settings.gpus_per_trial > 0 and resources.get("GPU", 0) < settings.gpus_per_trial:
        raise ConfigError(
            f"--gpus-per-trial {settings.gpus_per_trial:g} but the cluster has {resources.get('GPU', 0):g} GPUs: "
            "trials would wait forever; use --gpus-per-trial 0 or add GPU nodes"
        )
    if settings.driver_resource and resources.get(settings.driver_resource, 0) < 1:
        raise ConfigError(
            f"--driver-resource {settings.driver_resource}: no node of the cluster offers that resource, so "
            "trials would wait forever; start the head with it (ray start --resources "
            f"'{{\"{settings.driver_resource}\": 8}}', as cluster.yaml does) or drop the flag"
        )
    if resources.get("CPU", 0) < settings.cpus_per_trial:
        raise ConfigError(
            f"--cpus-per-trial {settings.cpus_per_trial:g} but the cluster has {resources.get('CPU', 0):g} CPUs"
        )


def _storage_root(settings: SearchSettings) -> str:
    from .object_storage import check_writable, is_uri

    if is_uri(settings.storage):
        check_writable(settings.storage)
        return settings.storage.rstrip("/")
    root = Path(settings.storage).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".raysparse-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"storage path {root} cannot be written ({exc.strerror}): choose another --storage") from None
    return str(root)


def run_search(settings: SearchSettings, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) a search; write the results table and the best config; return a report."""
    from ray import tune

    from .object_storage import is_uri, join, read_text, upload_dir

    remote: str | None = None  # the experiment's URI when --storage is object storage
    if resume:
        if is_uri(resume):
            remote = resume.rstrip("/")
            text = read_text(join(remote, SEARCH_STATE_FILE))
            experiment = _local_mirror(remote)
        else:
            experiment = Path(resume).resolve()
            state_file = experiment / SEARCH_STATE_FILE
            text = state_file.read_text() if state_file.is_file() else None
        if text is None:
            raise ConfigError(f"{resume} is not a raysparse search folder (no {SEARCH_STATE_FILE})")
        saved = json.loads(text)
        settings = SearchSettings(**saved["settings"]).validate()
        space = parse_space(saved["space"], source=saved["space"].get("source"))
    else:
        settings.validate()
        space = load_space(settings.space)
        name = settings.name or time.strftime("search-%Y-%m-%dT%H-%M-%S")
        root = _storage_root(settings)
        if is_uri(root):
            remote = join(root, name)
            experiment = _local_mirror(remote)
        else:
            experiment = Path(root) / name
    _connect(settings)
    _check_resources(settings, space)
    if remote is None:
        from .preflight import check_shared_storage

        check_shared_storage(str(experiment.parent))

    stats_dir = None if remote else _stats_cache_dir(experiment)
    coordinator = None
    if stats_dir is not None:
        from .cache import start_coordinator

        coordinator = start_coordinator(stats_dir)
    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, space=space, stats_cache=stats_dir,
                             trials_root=None if remote else str(experiment), storage_uri=remote),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial,
         **({settings.driver_resource: 1} if settings.driver_resource else {})},
    )
    started = time.perf_counter()
    searcher = None
    if resume:
        tuner = tune.Tuner.restore(remote or str(experiment), trainable=trainable, resume_errored=True)
    else:
        experiment.mkdir(parents=True, exist_ok=True)
        (experiment / SEARCH_STATE_FILE).write_text(json.dumps(
            {"settings": dataclasses.asdict(settings), "space": space.to_dict()}, indent=2, default=str))
        if remote:
            upload_dir(experiment, remote)  # so --resume URI works after a driver crash
        searcher = _make_searcher(space, settings)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher,
                                        scheduler=_make_scheduler(settings), num_samples=settings.num_samples),
            run_config=tune.RunConfig(
                name=experiment.name, storage_path=remote.rsplit("/", 1)[0] if remote else str(experiment.parent),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
        )
    grid = tuner.fit()
    study = _live_study(searcher)
    report = summarise_results(grid, space, settings, experiment, study)
    if remote:
        upload_dir(experiment, remote)
        report.update(experiment=remote, local_copy=str(experiment))
    report["wall_s"] = round(time.perf_counter() - started, 2)
    if coordinator is not None:
        import ray

        report["cache"] = ray.get(coordinator.get_stats.remote())
    return report


def _stats_cache_dir(experiment: Path) -> str:
    """Shared statistics live beside the experiments, so later searches reuse them too.

    Only on a filesystem storage path: the cache's values are files every trial reads, so
    with object storage (nothing shared to read from) each trial computes its own.
    """
    return str(experiment.parent / "stats_cache")


def _local_mirror(remote: str) -> Path:
    """Where the driver writes an object-storage experiment's outputs before uploading them."""
    import tempfile

    return Path(tempfile.gettempdir()) / "raysparse-searches" / remote.rstrip("/").rsplit("/", 1)[-1]


def _trial_status(result, target: float) -> str:
    if result.error is not None:
        return "error"
    metrics = result.metrics or {}
    if metrics.get("completed"):
        return "completed"
    return "stopped"  # cut by the early-stopping scheduler before reaching the target


def _live_study(searcher):
    """The searcher's in-memory Optuna study (fresh runs; a restored Tuner keeps its own copy)."""
    inner = getattr(searcher, "searcher", searcher)
    return getattr(inner, "_ot_study", None)


def summarise_results(grid, space: SearchSpace, settings: SearchSettings, experiment: Path,
                      study=None) -> dict[str, Any]:
    """One row per trial (config, metrics, status, error) as CSV + Parquet; the best config as JSON."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    metrics_names, modes = OBJECTIVES[settings.objective]
    rows = []
    histories: dict[str, list[dict[str, Any]]] = {}
    for result in grid:
        metrics = result.metrics or {}
        params = {k: v for k, v in (result.config or {}).items() if k in space.params}
        try:
            target = space.sample_config(result.config or {}).target_ratio
        except RaysparseError:
            target = float("nan")
        row = {
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "status": _trial_status(result, target),
            "error": error_reason(result.error) if result.error else None,
            **{f"param_{k}": v for k, v in params.items()},
            **{k: metrics.get(k) for k in ("final_ppl", "ppl_dense", "sparsity", "iteration",
                                            "train_steps_total", "params_remaining", "ppl_after_prune",
                                            "recovery_pct",
                                            "node_id", "attempt", "resumed_after")},
            "path": result.path,
        }
        rows.append(row)
        frame = result.metrics_dataframe
        if frame is not None and "sparsity" in frame:
            histories[row["trial_id"]] = frame[["sparsity", "final_ppl"]].dropna().to_dict("records")
    columns = sorted({k for row in rows for k in row}, key=lambda k: (not k.startswith(("trial", "status")), k))
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    pq.write_table(table, experiment / RESULTS_PARQUET)
    pacsv.write_csv(table, experiment / RESULTS_CSV)

    completed = [r for r in rows if r["status"] == "completed" and r["final_ppl"] is not None]
    best = min(completed, key=lambda r: r["final_ppl"]) if completed else None
    pareto = pareto_front(completed, metrics_names) if len(metrics_names) > 1 else None
    best_config_path = None
    if best is not None:
        best_params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_")}
        config = space.sample_config(best_params).to_dict()
        config["output"] = None
        best_config_path = experiment / BEST_CONFIG_FILE
        best_config_path.write_text(json.dumps(config, indent=2))
    from .report import export_study, write_plots

    plots = write_plots(experiment, histories, rows, study)
    study_url = export_study(study, experiment) if study is not None else None
    return {"experiment": str(experiment), "rows": rows, "best": best, "pareto": pareto,
            "best_config": str(best_config_path) if best_config_path else None, "plots": plots,
            "optuna_storage": study_url, "pareto_metrics": metrics_names}


def error_reason(error: BaseException) -> str:
    """The user-facing reason of a failed trial: the last line of Ray's wrapped traceback."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def pareto_front(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """Rows not dominated on every (minimised) metric."""
    def dominates(a, b):
        return all(a[m] <= b[m] for m in metrics) and any(a[m] < b[m] for m in metrics)

    return [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'trial':<16} {'status':<10} {'final_ppl':>10} {'sparsity':>8}  params  "
             "(stopped = cut early at a sparsity milestone; its ppl is at that sparsity)"]
    order = {"completed": 0, "stopped": 1, "error": 2}  # a stopped trial's ppl is at a lower sparsity
    for row in sorted(report["rows"], key=lambda r: (order.get(r["status"], 3), r["final_ppl"] is None,
                                                     r["final_ppl"] or 0)):
        params = " ".join(f"{k[6:]}={_fmt(v)}" for k, v in row.items() if k.startswith("param_"))
        ppl = f"{row['final_ppl']:.4f}" if row["final_ppl"] is not None else "-"
        sparsity = f"{row['sparsity']:.4f}" if row["sparsity"] is not None else "-"
        lines.append(f"{row['trial_id']:<16} {row['status']:<10} {ppl:>10} {sparsity:>8}  {params}"
                     + (f"  error: {row['error']}" if row["error"] else ""))
    if report["best"]:
        lines.append(f"best: {report['best']['trial_id']} final_ppl {report['best']['final_ppl']:.4f}")
        lines.append(f"best config: {report['best_config']}  (re-run: python launch/prune.py --config {report['best_config']})")
    else:
        lines.append("no trial completed")
    if report.get("pareto"):
        names = report.get("pareto_metrics") or ["final_ppl", "train_steps_total"]
        lines.append(f"pareto set ({' vs '.join(names)}): " + ", ".join(
            f"{r['trial_id']} (" + ", ".join(_fmt(r[name]) for name in names) + ")" for r in report["pareto"]))
    lines.append(f"results: {report['experiment']}/{RESULTS_CSV} and {RESULTS_PARQUET}"
                 + (f" (local copy: {report['local_copy']})" if report.get("local_copy") else ""))
    if report.get("cache"):
        cache = report["cache"]
        lines.append(f"stats cache: {cache['hits']} hits, {cache['misses']} computed, "
                     f"{cache['saved_s']:.1f}s saved")
    if report.get("plots"):
        lines.append("plots: " + ", ".join(Path(p).name for p in report["plots"]))
    if report.get("optuna_storage"):
        lines.append(f"optuna study: optuna-dashboard {report['optuna_storage']}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
