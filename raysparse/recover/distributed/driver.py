"""Masked fine-tuning sharded over Ray Train workers with FSDP2.

Why this shape:

- The training loop is `training.fit`, the same one local recovery uses; the workers only
  add sharding, mask hooks and a per-epoch `ray.train.report`, so a trial trains the same
  way on one process or many.
- The model travels once through the object store as (class, config, state dict); each
  worker rebuilds it without random initialisation and shards every decoder block, then
  the whole model, with FSDP2 `fully_shard` (Ray's `prepare_model(parallel_strategy="fsdp")`
  refuses CPU). Masks are sharded like their parameters by `mask_hooks`.
- Every epoch the FULL state dict is gathered and rank 0 writes it, with the epoch records
  so far, as a checkpoint. A run with the same `run_name` and `storage_path` resumes from
  its latest checkpoint (Ray Train restores its checkpoint manager from storage), so a
  killed search loses at most one epoch. A fingerprint of model, masks, data and settings
  guards against resuming somebody else's run that happens to share the name.
- The driver picks the final or best epoch's checkpoint (the same semantics as `fit` with
  `keep_best`) and loads it into the caller's model in place; sparsity is then verified
  exactly, because "a pruned weight stays zero through FSDP sharding" is an invariant.

Batch semantics: `settings.batch_size` is the GLOBAL batch. Each of the N workers gets
1/N of the windows and batches of `batch_size // N`, so an epoch has the same number of
optimizer steps as local training and the trajectory does not depend on the worker count
(up to data order).

Failures and a loaded machine: Ray Train restarts the worker group from the latest epoch
checkpoint up to `retries` times (`FailureConfig(max_failures=...)`) after a worker, node or
collective failure. A NaN loss, a broken mask or a bad setting would only repeat: the failing
rank records it in `worker_error.json` and the restarted workers find it and stop at once,
so the driver raises it without retraining. Ray's start-up timeouts assume an idle machine
(60 s for a worker group to start); `TRAIN_ENV` sizes them for 2 workers importing torch
beside busy cores. Train state tracking and the PlacementGroupCleaner both poll the State API,
which only a dashboard serves: without a reachable dashboard state tracking stays off and the
cleaner is not started (its failed polls printed a warning a second and, under load, it could
remove the live run's placement group).

Early stopping is decided over the whole run (epochs before a resume count), and the run
log in each checkpoint says which epochs each (re)start trained. Known limit: `fit` builds
its AdamW optimizer and LR schedule itself, so after a resume the optimizer moments and the
warm-up start afresh (a resumed run is close to, not bit-identical with, an uninterrupted one).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysparse.errors import ConfigError, RaysparseError
from raysparse.recover.distill import DistillSettings
from raysparse.recover.distributed.job import EvalSpec, TeacherJob, _Job
from raysparse.recover.distributed.ray_env import (
    EnvSet,
    dashboard_reachable,
    joinable_cluster_address,
    train_env,
    trainer_class,
)
from raysparse.recover.distributed.weights import _dedupe, _fingerprint, _is_tied, _read_meta, _read_weights
from raysparse.recover.distributed.worker import _floating_dtype, _train_worker
from raysparse.recover.loop import EpochRecord, TrainingDiverged, TrainResult, TrainSettings
from raysparse.sparsity.masks import Masks, MaskViolation, verify_masks

logger = logging.getLogger(__name__)

DEFAULT_RETRIES = 2

# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def train_masked_distributed(
    model: nn.Module,
    masks: Masks,
    windows: torch.Tensor,
    settings: TrainSettings,
    eval_spec: EvalSpec | None,
    workers: int,
    storage_path: str,
    run_name: str,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    teacher: nn.Module | None = None,
    distill: DistillSettings | None = None,
    retries: int = DEFAULT_RETRIES,
) -> TrainResult:
    """Fine-tune a pruned `model` on `workers` FSDP workers, keeping `masks` exact.

    The caller's `model` is updated in place with the final weights (or the best epoch's,
    when `settings.keep_best` and an `eval_spec` are given; the untouched input when no
    epoch beat the baseline). Raises ConfigError when the cluster cannot place the workers
    or `run_name` already holds a different run, TrainingDiverged on a NaN/inf loss, and
    MaskViolation if a pruned weight came back non-zero. With a `teacher` and `distill`
    settings the workers distil from it, the teacher sharded over them like the student.
    """
    _validate(windows, eval_spec, workers, cpus_per_worker)
    started_ray = _ensure_ray(workers, cpus_per_worker, use_gpu)
    try:
        from ray.train import Result

        storage_path = storage_path if "://" in storage_path else os.path.abspath(storage_path)
        state, aliases = _dedupe(model.state_dict())  # before .cpu(): aliases are found by storage
        state = {key: tensor.detach().cpu() for key, tensor in state.items()}
        job = _Job(
            model_cls=type(model), model_config=model.config, dtype=_floating_dtype(model), aliases=aliases,
            masks={name: mask.detach().cpu().bool() for name, mask in masks.items()},
            windows=windows.detach().cpu(), settings=settings,
            eval_spec=dataclasses.replace(eval_spec, stream=eval_spec.stream.detach().cpu()) if eval_spec else None,
            fingerprint=_fingerprint(model, masks, windows, settings, eval_spec), use_gpu=use_gpu,
            error_file="" if "://" in storage_path else os.path.join(storage_path, run_name, "worker_error.json"),
        )
        teacher_state = None
        if teacher is not None and distill is not None and distill.enabled:
            teacher_state, teacher_aliases = _dedupe(teacher.state_dict())
            teacher_state = {key: tensor.detach().cpu() for key, tensor in teacher_state.items()}
            job.teacher = TeacherJob(type(teacher), teacher.config, _floating_dtype(teacher), teacher_aliases, distill)
            # Another teacher or loss is another job: never resume a run that distilled differently.
            job.fingerprint = f"{job.fingerprint}-{_fingerprint(teacher, {}, windows[:1], settings, None)}-{distill}"
        previous = _previous_run(storage_path, run_name, job.fingerprint)
        if previous is not None and _finished(previous, settings):
            logger.info("run '%s' already finished %s epoch(s): loading its checkpoints", run_name,
                        len(previous[1]["records"]))
            result: Result = previous[0]
        else:
            if previous is not None:
                logger.info("run '%s' resumes after epoch %d", run_name, previous[1]["records"][-1]["epoch"])
            result = _run_trainer(job, state, workers, storage_path, run_name, use_gpu, cpus_per_worker,
                                  teacher_state, retries)
        return _finish(model, masks, result, settings, run_name)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _validate(windows: torch.Tensor, eval_spec: EvalSpec | None, workers: int, cpus_per_worker: float) -> None:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if cpus_per_worker <= 0:
        raise ConfigError(f"cpus per worker must be positive, got {cpus_per_worker}")
    if windows.dim() != 2:
        raise ConfigError(f"training windows must be a 2-D tensor of token ids, got shape {tuple(windows.shape)}")
    if windows.shape[0] < workers:
        raise ConfigError(
            f"--workers {workers} needs at least {workers} training windows (one per worker), "
            f"got {windows.shape[0]}: raise --train-samples or lower --workers"
        )
    if eval_spec is not None and eval_spec.stream.dim() != 1:
        raise ConfigError("the evaluation stream must be a 1-D tensor of token ids")


def _ensure_ray(workers: int, cpus_per_worker: float, use_gpu: bool) -> bool:
    """Check the cluster can place the workers; start a local Ray if none is running.

    Returns True when this call started (or connected) Ray and so must shut it down. The
    check runs before anything launches: a Train run asking for more than the cluster
    has would otherwise wait for resources forever.
    """
    import ray

    started = False
    if ray.is_initialized():
        resources = ray.cluster_resources()
    elif (address := joinable_cluster_address()) is not None:  # RAY_ADDRESS or a `ray start` here
        try:  # joining: its size is what it is (num_cpus/num_gpus would be refused)
            ray.init(address=address)
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]} "
                              "(unset RAY_ADDRESS to run locally, or start the cluster)") from None
        started = True
        resources = ray.cluster_resources()
    else:
        resources = {"CPU": float(os.cpu_count() or 1),
                     "GPU": float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0}
    try:
        _check_resources(resources, workers, cpus_per_worker, use_gpu)
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=int(resources["CPU"]), num_gpus=int(resources["GPU"]),
                 include_dashboard=False)
        started = True
    else:
        available = ray.available_resources()
        if available.get("CPU", 0.0) < workers * cpus_per_worker:
            logger.warning(
                "%d workers need %g CPUs but only %g are free now; the run waits until they are "
                "(inside a Tune trial, give the trial a fractional CPU so driver + workers fit)",
                workers, workers * cpus_per_worker, available.get("CPU", 0.0),
            )
    return started


def _check_resources(resources: dict[str, float], workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    need_cpu = workers * cpus_per_worker
    have_cpu = resources.get("CPU", 0.0)
    if need_cpu > have_cpu:
        raise ConfigError(
            f"--workers {workers} needs {need_cpu:g} CPUs ({cpus_per_worker:g} per worker) but the cluster has "
            f"{have_cpu:g}; lower --workers or start a bigger Ray cluster"
        )
    if use_gpu and workers > resources.get("GPU", 0.0):
        raise ConfigError(
            f"--workers {workers} needs {workers} GPUs (one per worker) but the cluster has "
            f"{resources.get('GPU', 0.0):g}; lower --workers or run on CPU"
        )


def _run_trainer(job: _Job, state: dict[str, torch.Tensor], workers: int, storage_path: str, run_name: str,
                 use_gpu: bool, cpus_per_worker: float, teacher_state: dict[str, torch.Tensor] | None = None,
                 retries: int = DEFAULT_RETRIES):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    scored = job.settings.keep_best and job.eval_spec is not None
    # The latest checkpoint is always kept (resume needs it); with keep_best also the best.
    checkpoint_config = (CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="ppl",
                                          checkpoint_score_order="min")
                         if scored else CheckpointConfig(num_to_keep=1))
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    if job.error_file:  # left by a killed earlier call: it would stop these workers at once
        Path(job.error_file).unlink(missing_ok=True)
    dashboard = dashboard_reachable()
    env = train_env(dashboard)
    if not dashboard:
        logger.info("no Ray dashboard reachable: Train state tracking and placement-group cleaner off")
    # With a dashboard, state tracking lists the run in its Train tab (the state actor lives on
    # the head node, outside any Tune trial's placement group). Opt out with the variable at 0.
    with EnvSet(env):
        trainer = trainer_class(dashboard)(
            _train_worker,
            train_loop_config={"job": ray.put(job), "state": ray.put(state),
                               "teacher_state": ray.put(teacher_state) if teacher_state is not None else None},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name, storage_path=storage_path, checkpoint_config=checkpoint_config,
                # Restarts resume from the latest epoch checkpoint; a recorded NaN / mask error is not retried.
                failure_config=FailureConfig(max_failures=retries),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as error:  # noqa: BLE001 - re-raised as the worker's own error when we know it
            surfaced = _worker_error(error, job.error_file)
            if surfaced is error:
                raise
            raise surfaced from error
    recorded = _recorded_worker_error(job.error_file)  # the restarted workers found it and stopped
    if recorded is not None:
        raise recorded
    return result


def _recorded_worker_error(error_file: str) -> Exception | None:
    path = Path(error_file) if error_file else None
    if path is None or not path.is_file():
        return None
    record = json.loads(path.read_text())
    path.unlink()
    kinds = {"TrainingDiverged": TrainingDiverged, "MaskViolation": MaskViolation, "ConfigError": ConfigError}
    return kinds.get(record["type"], RaysparseError)(record["message"])


def _worker_error(error: Exception, error_file: str = "") -> Exception:
    """Turn Ray's wrapper around a worker failure back into the error a caller can handle."""
    recorded = _recorded_worker_error(error_file)
    if recorded is not None:
        return recorded
    failures = getattr(error, "worker_failures", None) or {}
    for _rank, failure in sorted(failures.items()):
        cause = _unwrap(failure)
        if isinstance(cause, (TrainingDiverged, RaysparseError, MaskViolation)):
            return cause
    text = str(error)
    if "TrainingDiverged" in text:
        return TrainingDiverged(f"distributed recovery stopped: NaN/inf loss in a worker\n{text}")
    return error


def _unwrap(failure: BaseException) -> BaseException:
    seen: set[int] = set()
    current: BaseException | None = failure
    while current is not None and id(current) not in seen:
        if isinstance(current, (TrainingDiverged, RaysparseError, MaskViolation)):
            return current
        seen.add(id(current))
        nested = getattr(current, "cause", None)
        current = nested if isinstance(nested, BaseException) else (current.__cause__ or current.__context__)
    return failure


def _previous_run(storage_path: str, run_name: str, fingerprint: str) -> tuple[Any, dict[str, Any]] | None:
    """(Result, meta) of an earlier run with this name, or None; ConfigError if it is another job's."""
    from ray.train import Result

    path = f"{storage_path.rstrip('/')}/{run_name}"
    try:
        result = Result.from_path(path)
    except RuntimeError:  # no folder, or no checkpoint was ever reported
        return None
    if result.checkpoint is None:
        return None
    meta = _read_meta(result.checkpoint)
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"run '{run_name}' in {storage_path} holds checkpoints of a different model, masks, data or "
            f"settings; give this recovery a new run name or delete {path}"
        )
    return result, meta


def _finished(previous: tuple[Any, dict[str, Any]], settings: TrainSettings) -> bool:
    """True when the stored run already trained every epoch asked for (or stopped early)."""
    meta = previous[1]
    records = meta["records"]
    return bool(records) and (records[-1]["epoch"] >= settings.epochs or bool(meta.get("stopped_early")))


def _finish(model: nn.Module, masks: Masks, result: Any, settings: TrainSettings, run_name: str) -> TrainResult:
    """Rebuild the TrainResult from the checkpointed records and load the chosen weights."""
    if result.checkpoint is None:
        raise RuntimeError(f"distributed recovery '{run_name}' finished without a checkpoint")
    meta = _read_meta(result.checkpoint)
    train = _summarise(meta["baseline_ppl"], [EpochRecord(**r) for r in meta["records"]], settings,
                       bool(meta.get("stopped_early")))
    target = train.best_epoch if settings.keep_best and train.best_epoch is not None else None
    last = train.epochs[-1].epoch if train.epochs else 0
    if target is None or target == last:
        checkpoint = result.checkpoint
        chosen = last
    elif target == 0:
        checkpoint, chosen = None, 0  # no epoch beat the baseline: the caller's model is it
    else:
        matches = [ckpt for ckpt, metrics in (result.best_checkpoints or []) if metrics.get("epoch") == target]
        if not matches:
            raise RuntimeError(f"the checkpoint of best epoch {target} of run '{run_name}' is missing")
        checkpoint, chosen = matches[0], target
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _read_weights(Path(folder))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not _is_tied(model, key) for key in missing):
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    if chosen != last:
        logger.info("recovery '%s': using the best epoch %d (ppl %.4f) instead of the last", run_name, chosen,
                    train.best_ppl)
    verify_masks(model, masks)
    return train


def _summarise(baseline: float | None, records: list[EpochRecord], settings: TrainSettings,
               stopped_early: bool) -> TrainResult:
    """The TrainResult `fit` would have returned for these epochs (best/final as with keep_best)."""
    train = TrainResult(baseline_ppl=baseline, epochs=records, best_ppl=baseline,
                        best_epoch=0 if baseline else None)
    for record in records:
        train.steps += record.steps
        train.final_ppl = record.ppl
        if record.ppl is not None and (train.best_ppl is None or record.ppl < train.best_ppl):
            train.best_ppl, train.best_epoch = record.ppl, record.epoch
    last = records[-1].epoch if records else 0
    if settings.keep_best and baseline is not None and train.best_epoch is not None and train.best_epoch != last:
        train.final_ppl = train.best_ppl
    train.stopped_early = stopped_early
    return train
