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
import time
from pathlib import Path
from typing import Any

from raysparse.cluster.preflight import (
    check_address_reachable,
    check_shared_storage,
    send_token_like_auto,
    token_refused_hint,
)
from raysparse.cluster.storage import check_writable, is_uri, join, read_text, upload_dir
from raysparse.config import TrialConfig
from raysparse.data.text import NAMED_DATASETS
from raysparse.errors import ConfigError, Interrupted, RaysparseError
from raysparse.paths import write_json_atomic
from raysparse.recover.distributed.ray_env import joinable_cluster_address
from raysparse.search.console import legacy_table, stop_gracefully_on_ctrl_c, trial_table, tune_statuses
from raysparse.search.final_eval import evaluate_chosen
from raysparse.search.results import _live_study, summarise_results
from raysparse.search.searcher import _make_scheduler, _make_searcher, max_recovery_epochs
from raysparse.search.settings import (
    ASHA_STATE_FILE,
    CACHE_STATS_FILE,
    OBJECTIVES,
    SEARCH_STATE_FILE,
    SearchSettings,
    parse_search_state,
)
from raysparse.search.space import SearchSpace
from raysparse.search.space_file import load_space, parse_space
from raysparse.search.trainable import search_trainable
from raysparse.trial.cache import start_coordinator, stop_coordinator

logger = logging.getLogger(__name__)


# Tune checkpoints kept per trial on storage (each holds the model's weights). Resuming needs
# only the latest, but Tune forces an experiment-state snapshot after every `num_to_keep`
# checkpoints of a trial (so a restored experiment names one that still exists): with one
# kept, every iteration of every trial would force a snapshot, which Tune warns about.
CHECKPOINTS_KEPT = 2


def _connect(settings: SearchSettings) -> None:
    import ray

    if ray.is_initialized():
        return
    if settings.address:
        check_address_reachable(settings.address)  # ray.init would hang for minutes on a dead address
    from ray.exceptions import AuthenticationError

    sent_token = send_token_like_auto(settings.address)
    try:
        if settings.address:
            ray.init(address=settings.address, log_to_driver=False)
        else:  # a live `ray start` here is joined; a stale record of a killed one is not
            ray.init(address=joinable_cluster_address() or "local", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
        hint = token_refused_hint(settings.address, sent_token)  # the port answered (checked above)
        if hint is not None:
            raise ConfigError(hint) from None
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


def build_presets_first(space: SearchSpace) -> None:
    """Build the `tiny` preset here, in the driver, before Ray starts, when the space uses it
    and the cache lacks it: announced in one line, with the build's own progress bar, instead
    of minutes of RUNNING trials with no metrics while each trial waits on the build."""
    from raysparse.models.tiny import TINY_PRESET_NAME, ensure_tiny_model, tiny_model_is_built

    spec = space.params.get("model")
    models = list(spec.choices) if spec is not None and spec.kind == "choice" else [
        space.fixed.get("model", TrialConfig().model)]
    if TINY_PRESET_NAME not in models or tiny_model_is_built():
        return
    print(f"building the '{TINY_PRESET_NAME}' preset once, before the search starts (about two minutes on "
          "CPU; it is cached for every later run)", flush=True)
    ensure_tiny_model()


def _storage_root(settings: SearchSettings) -> str:
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
    remote: str | None = None  # the experiment's URI when --storage is object storage
    if resume:
        if is_uri(resume):
            remote = resume.rstrip("/")
            text = read_text(join(remote, SEARCH_STATE_FILE))
            experiment = _local_mirror(remote)
        else:
            experiment = Path(resume).resolve()
            state_file = experiment / SEARCH_STATE_FILE
            text = state_file.read_bytes().decode("utf-8", errors="replace") if state_file.is_file() else None
        if text is None:
            raise ConfigError(f"{resume} is not a raysparse search folder (no {SEARCH_STATE_FILE})")
        settings, recorded = parse_search_state(text, f"{resume.rstrip('/')}/{SEARCH_STATE_FILE}")
        space = parse_space(recorded, source=recorded.get("source"))
    else:
        settings.validate()
        space = load_space(settings.space)
        check_validation_source(space)
        if not settings.address:  # a cluster's nodes may see other files than this driver
            check_space_inputs(space)
        check_objective_inputs(settings, space)
        check_fidelity(settings, space)
        name = settings.name or time.strftime("search-%Y-%m-%dT%H-%M-%S")
        root = _storage_root(settings)
        if is_uri(root):
            remote = join(root, name)
            experiment = _local_mirror(remote)
        else:
            experiment = Path(root) / name
    try:
        build_presets_first(space)
        _connect(settings)
        _check_resources(settings, space)
        if remote is None:
            check_shared_storage(str(experiment.parent))
        if not settings.cache:
            return _run_tuner(settings, space, experiment, remote, resume, None, None)
        stats_dir = _stats_cache_location(remote, experiment)
        coordinator = start_coordinator(stats_dir, memory_bytes=settings.cache_memory << 20)
        try:
            return _run_tuner(settings, space, experiment, remote, resume, stats_dir, coordinator)
        finally:  # its values leave the object store; storage keeps them for the next search
            stop_coordinator(coordinator, stats_dir)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's loop
        state = resume or remote or (str(experiment) if (experiment / SEARCH_STATE_FILE).is_file() else None)
        raise Interrupted(state) from None


def _run_tuner(settings: SearchSettings, space: SearchSpace, experiment: Path, remote: str | None,
               resume: str | None, stats_dir: str | None, coordinator: Any) -> dict[str, Any]:
    """Run (or restore) the Tuner, summarise it, evaluate the chosen configurations."""
    import ray
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, space=space, experiment=remote or str(experiment),
                             stats_cache=stats_dir, project=settings.rung_metric == "projected",
                             epoch_reports=settings.fidelity == "epochs"),
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
                                        scheduler=_make_scheduler(settings, str(experiment / ASHA_STATE_FILE), space),
                                        num_samples=settings.num_samples),
            run_config=tune.RunConfig(
                name=experiment.name, storage_path=remote.rsplit("/", 1)[0] if remote else str(experiment.parent),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                progress_reporter=trial_table(space, settings), verbose=1),
        )
    with stop_gracefully_on_ctrl_c() as interrupted, legacy_table():
        grid = tuner.fit()
    study = _live_study(searcher)
    report = summarise_results(grid, space, settings, experiment, study,
                               statuses=tune_statuses(grid) if interrupted.is_set() else None)
    if interrupted.is_set():  # Tune saved the experiment's state: hand the resume command up
        if remote:
            upload_dir(experiment, remote)
        raise Interrupted(remote or str(experiment), report)
    report["final_eval"] = evaluate_chosen(report, space, settings, experiment, stats_dir)
    if coordinator is not None:  # what was computed, served and held, kept beside the results
        report["cache"] = ray.get(coordinator.get_stats.remote())
        write_json_atomic(experiment / CACHE_STATS_FILE, report["cache"])
    if remote:
        upload_dir(experiment, remote)
        report.update(experiment=remote, local_copy=str(experiment))
    report["wall_s"] = round(time.perf_counter() - started, 2)
    return report


def check_objective_inputs(settings: SearchSettings, space: SearchSpace) -> None:
    """A zero-shot objective needs lm-eval tasks in every trial: refuse a space without them."""
    metrics, _ = OBJECTIVES[settings.objective]
    if "val_zeroshot_acc" not in metrics:
        return
    if "eval_tasks" in space.params or not space.fixed.get("eval_tasks"):
        raise ConfigError(f"--objective {settings.objective} ranks trials by lm-eval accuracy: set eval_tasks "
                          f"(e.g. raysparse_lastword_pydoc) under fixed: in {space.source}")


def check_fidelity(settings: SearchSettings, space: SearchSpace) -> None:
    """--fidelity epochs compares trials after equal recovery epochs: only one-shot trials with
    in-process recovery (an iterative trial's epochs come at several sparsity levels, and
    distributed recovery's epochs run on Train workers that report once per iteration)."""
    if settings.fidelity != "epochs":
        return
    fixed = space.fixed

    def where(key: str) -> str:
        return f"{key} is searched" if key in space.params else f"{key}: {fixed.get(key)}"

    if "schedule" in space.params or fixed.get("schedule", "oneshot") != "oneshot":
        raise ConfigError(f"--fidelity epochs ranks one-shot trials by recovery epochs, but {space.source} has "
                          f"{where('schedule')}: fix schedule: oneshot, or use --fidelity sparsity")
    if fixed.get("recovery", "none") == "none" and "recovery" not in space.params:
        raise ConfigError(f"--fidelity epochs needs recovery epochs: {space.source} fixes recovery: none "
                          "(set recovery: masked or lora, or use --no-early-stopping)")
    if "workers" in space.params or int(fixed.get("workers", 1)) > 1:
        raise ConfigError(f"--fidelity epochs: {space.source} has {where('workers')}; distributed recovery "
                          "reports once per iteration, not per epoch (use workers: 1, or --fidelity sparsity)")
    epochs = max_recovery_epochs(space)
    if settings.early_stopping and settings.grace_epochs >= epochs:
        raise ConfigError(f"--grace-epochs {settings.grace_epochs} must be below the {epochs} recovery epoch(s) "
                          f"the trials of {space.source} train (epochs_per_iteration), e.g. --grace-epochs 1")


def check_validation_source(space: SearchSpace) -> None:
    """A search decides on validation text: refuse a test file with no validation text named."""
    def values(key: str) -> list[Any]:
        if key in space.params:
            spec = space.params[key]
            return list(spec.choices) if spec.kind == "choice" else [None]
        return [space.fixed.get(key)]

    files = [v for v in values("eval_data") if v is not None and v not in NAMED_DATASETS]
    if files and all(v is None for v in values("val_data")):
        raise ConfigError(
            f"{space.source}: eval_data {files[0]} is test text and the space names no val_data: a search "
            "decides on validation text only; add val_data: PATH (text disjoint from the test file) under fixed:"
        )


# Settings naming files or datasets a trial reads: checked for each choice a space offers.
_INPUT_KEYS = ("calib_data", "eval_data", "val_data", "train_data", "importance_config", "model")


def check_space_inputs(space: SearchSpace) -> None:
    """The trial's file checks (data files exist and are text, hub datasets cached when the
    hub is unreachable, the importance file) before Ray starts, for the fixed settings and
    every choice of a file-valued param: otherwise each trial fails the same way, later."""
    from raysparse.config.inputs import check_inputs

    variants = [{}] + [{key: value} for key, spec in space.params.items() if key in _INPUT_KEYS
                       and spec.kind == "choice" for value in spec.choices]
    for overrides in variants:
        values = {**space.fixed, **{key: spec.first() for key, spec in space.params.items()}, **overrides}
        known = {key: value for key, value in values.items() if key in TrialConfig.__dataclass_fields__}
        config = dataclasses.replace(TrialConfig.from_dict(known, source=space.source), output=None)
        try:
            check_inputs(config)
        except RaysparseError as exc:
            raise type(exc)(f"{space.source}: {exc}") from None


def _stats_cache_location(remote: str | None, experiment: Path) -> str:
    """Cached values live beside the experiments on the search's storage (a folder or a URI),
    so a resumed search and later searches reuse them. Trials never read this location: the
    coordinator (on the driver's node) reads and writes it and serves values through the
    object store, so a cluster needs no shared filesystem for the cache.
    """
    return join(remote.rsplit("/", 1)[0], "stats_cache") if remote else str(experiment.parent / "stats_cache")


def _local_mirror(remote: str) -> Path:
    """Where the driver writes an object-storage experiment's outputs before uploading them."""
    import tempfile

    return Path(tempfile.gettempdir()) / "raysparse-searches" / remote.rstrip("/").rsplit("/", 1)[-1]
