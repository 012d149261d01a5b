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

Early stopping is decided over the whole run (epochs before a resume count), and the run
log in each checkpoint says which epochs each (re)start trained. Known limit: `fit` builds
its AdamW optimizer and LR schedule itself, so after a resume the optimizer moments and the
warm-up start afresh (a resumed run is close to, not bit-identical with, an uninterrupted one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, RaysparseError
from ..masks import Masks, MaskViolation, verify_masks
from .masked import mask_hooks
from .training import EpochRecord, TrainingDiverged, TrainResult, TrainSettings, fit

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "recovery.json"


@dataclass
class EvalSpec:
    """How workers evaluate perplexity after every epoch (all ranks run the same windows,
    since an FSDP forward is a collective every rank must join)."""

    stream: torch.Tensor
    seqlen: int
    stride: int | None = None
    batch_size: int = 4
    max_windows: int | None = None


@dataclass
class _Job:
    """Everything a worker needs except the weights (shipped as a separate object so a
    resumed worker need not fetch them)."""

    model_cls: type
    model_config: Any
    dtype: torch.dtype
    aliases: dict[str, str]
    masks: Masks
    windows: torch.Tensor
    settings: TrainSettings
    eval_spec: EvalSpec | None
    fingerprint: str
    use_gpu: bool
    error_file: str = ""  # where a worker records a user-facing failure before raising


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
) -> TrainResult:
    """Fine-tune a pruned `model` on `workers` FSDP workers, keeping `masks` exact.

    The caller's `model` is updated in place with the final weights (or the best epoch's,
    when `settings.keep_best` and an `eval_spec` are given; the untouched input when no
    epoch beat the baseline). Raises ConfigError when the cluster cannot place the workers
    or `run_name` already holds a different run, TrainingDiverged on a NaN/inf loss, and
    MaskViolation if a pruned weight came back non-zero.
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
        previous = _previous_run(storage_path, run_name, job.fingerprint)
        if previous is not None and _finished(previous, settings):
            logger.info("run '%s' already finished %s epoch(s): loading its checkpoints", run_name,
                        len(previous[1]["records"]))
            result: Result = previous[0]
        else:
            if previous is not None:
                logger.info("run '%s' resumes after epoch %d", run_name, previous[1]["records"][-1]["epoch"])
            result = _run_trainer(job, state, workers, storage_path, run_name, use_gpu, cpus_per_worker)
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
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False)  # an existing cluster: its size is what it is
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
        ray.init(num_cpus=int(resources["CPU"]), num_gpus=int(resources["GPU"]), include_dashboard=False)
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
                 use_gpu: bool, cpus_per_worker: float):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scored = job.settings.keep_best and job.eval_spec is not None
    # The latest checkpoint is always kept (resume needs it); with keep_best also the best.
    checkpoint_config = (CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="ppl",
                                          checkpoint_score_order="min")
                         if scored else CheckpointConfig(num_to_keep=1))
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    # Read when the trainer is built: lists the run in the dashboard's Train tab (its state
    # actor lives on the head node, outside any Tune trial's placement group). Opt out with 0.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": ray.put(job), "state": ray.put(state)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, checkpoint_config=checkpoint_config,
            # A NaN or a bug repeats on retry; a killed run is resumed by calling again.
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        return trainer.fit()
    except Exception as error:  # noqa: BLE001 - re-raised as the worker's own error when we know it
        surfaced = _worker_error(error, job.error_file)
        if surfaced is error:
            raise
        raise surfaced from error


def _record_worker_error(error_file: str, exc: BaseException) -> None:
    """Write the failure where the driver looks first: Ray may report a sibling rank's
    health-check death instead of this exception when ranks fail at the same step."""
    if not error_file:
        return
    path = Path(error_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
    tmp.replace(path)


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


# --------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------
class _StopEarly(Exception):
    """Raised from `on_epoch_end` to leave `fit` when patience ran out over the WHOLE run."""


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rebuild, restore, shard, train with `fit`, report each epoch."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ..evaluate import perplexity

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job: _Job = ray.get(config["job"])
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(job.settings.seed)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _read_weights(Path(folder))
            meta = json.loads((Path(folder) / META_FILE).read_text())
    else:
        state, meta = ray.get(config["state"]), {"baseline_ppl": None, "records": [], "sessions": []}
    records = [EpochRecord(**r) for r in meta["records"]]
    baseline: float | None = meta["baseline_ppl"]
    start_epoch = records[-1].epoch if records else 0
    # A log of who trained which epochs, so a resume is auditable (and testable).
    sessions = meta.get("sessions", []) + [{"start_epoch": start_epoch, "workers": world, "epochs": []}]

    model = _build_model(job, state)
    del state
    model.to(device)
    _shard(model, device, world)
    after_backward, after_step = mask_hooks(model, job.masks)
    for param in model.parameters():
        param.requires_grad_(True)

    # Each worker trains on its own 1/world of the windows, equal counts so every rank runs
    # the same number of (collective) forward/backward passes.
    per_rank = job.windows.shape[0] // world
    local_windows = job.windows[rank::world][:per_rank]
    local_batch = max(1, job.settings.batch_size // world)
    if rank == 0 and (job.settings.batch_size % world or job.windows.shape[0] % world):
        logger.warning("%d windows, global batch %d on %d workers: %d windows and batches of %d per worker",
                       job.windows.shape[0], job.settings.batch_size, world, per_rank, local_batch)
    # Best-epoch selection happens in the driver (from the checkpoints) and early stopping in
    # on_epoch_end (over the whole run, including epochs before a resume): `fit` does neither.
    settings = dataclasses.replace(job.settings, batch_size=local_batch, keep_best=False,
                                   early_stopping_patience=None)

    evaluate = None
    if job.eval_spec is not None:
        spec = job.eval_spec

        def evaluate() -> float:
            return perplexity(model, spec.stream, spec.seqlen, spec.stride, spec.batch_size, spec.max_windows,
                              device=device, desc=f"perplexity rank {rank}", progress=False).ppl

    if checkpoint is None and evaluate is not None:
        baseline = evaluate()
    if rank == 0 and start_epoch:
        logger.info("resuming after epoch %d of %d", start_epoch, settings.epochs)

    def on_epoch_end(record: EpochRecord) -> None:
        # Every rank saw other windows: the epoch's loss is the mean over ranks. Rank 0's
        # early-stopping decision is shared so that all ranks leave together.
        records.append(record)
        stop = _patience_ran_out(baseline, records, job.settings.early_stopping_patience)
        shared = torch.tensor([record.avg_loss, float(stop and rank == 0)], dtype=torch.float64, device=device)
        dist.all_reduce(shared)
        record.avg_loss = float(shared[0]) / world
        stop = bool(shared[1] > 0)
        sessions[-1]["epochs"].append(record.epoch)
        _report_epoch(model, job, records, baseline, sessions, stop, rank)
        if stop:
            raise _StopEarly

    try:
        fit(model, [p for p in model.parameters()], local_windows, settings, evaluate,
            after_backward=after_backward, after_step=after_step, on_epoch_end=on_epoch_end, device=device,
            desc=f"masked fine-tuning rank {rank}", progress=False, start_epoch=start_epoch, baseline_ppl=baseline)
    except (TrainingDiverged, RaysparseError, MaskViolation) as exc:
        _record_worker_error(job.error_file, exc)
        raise
    except _StopEarly:
        if rank == 0:
            logger.info("early stop after epoch %d: no improvement for %d epochs", records[-1].epoch,
                        job.settings.early_stopping_patience)


def _patience_ran_out(baseline: float | None, records: list[EpochRecord], patience: int | None) -> bool:
    """`fit`'s early-stopping rule applied to the whole run (best starts at the baseline)."""
    if not patience:
        return False
    best, bad = baseline, 0
    for record in records:
        if record.ppl is None:
            continue
        if best is None or record.ppl < best:
            best, bad = record.ppl, 0
        else:
            bad += 1
    return bad >= patience


def _report_epoch(model: nn.Module, job: _Job, records: list[EpochRecord], baseline: float | None,
                  sessions: list[dict[str, Any]], stopped_early: bool, rank: int) -> None:
    """Gather the full state dict (a collective), let rank 0 write it, report on every rank."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    record = records[-1]
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    metrics: dict[str, Any] = {"epoch": record.epoch, "loss": record.avg_loss, "steps": record.steps}
    if record.ppl is not None:
        metrics["ppl"] = record.ppl
    if baseline is not None:
        metrics["baseline_ppl"] = baseline
    with tempfile.TemporaryDirectory(prefix="raysparse-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            _check_state_masks(full, job.masks, record.epoch)
            state, aliases = _dedupe(full)
            _write_weights(Path(folder), state)
            meta = {"fingerprint": job.fingerprint, "baseline_ppl": baseline, "aliases": aliases,
                    "records": [dataclasses.asdict(r) for r in records], "sessions": sessions,
                    "stopped_early": stopped_early}
            (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        del full
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{record.epoch:04d}")


def _build_model(job: _Job, state: dict[str, torch.Tensor]) -> nn.Module:
    """The caller's model class from its config, weights from `state`; no random init."""
    with _no_init_weights():
        model = job.model_cls(job.model_config)
    model.to(job.dtype)
    full = dict(state)
    for alias, source in job.aliases.items():
        full.setdefault(alias, full[source])
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or any(not _is_tied(model, key) for key in missing):
        raise RuntimeError(f"state dict does not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _shard(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2: one unit per decoder block (so only one block is unsharded at a time), then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..models import get_adapter

    mesh = init_device_mesh(device.type, (world,))
    for layer in get_adapter(model).decoder_layers():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys that alias another tensor (tied embeddings): safetensors refuses shared storage."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        identity = (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        unique[key] = tensor
    return unique, aliases


def _is_tied(model: nn.Module, key: str) -> bool:
    """A key missing from a deduplicated state dict is fine if it is the same tensor as a present one."""
    state = model.state_dict()
    if key not in state:
        return False
    ptr = state[key].untyped_storage().data_ptr()
    return sum(1 for value in state.values() if value.untyped_storage().data_ptr() == ptr) > 1


def _write_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_FILE))
    meta = json.loads((folder / META_FILE).read_text())
    for alias, source in meta.get("aliases", {}).items():
        state.setdefault(alias, state[source])
    return state


def _read_meta(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / META_FILE).read_text())


def _check_state_masks(state: dict[str, torch.Tensor], masks: Masks, epoch: int) -> None:
    """Fail the epoch (not only the end) if a pruned weight moved: the invariant, checked early."""
    bad = [name for name, mask in masks.items() if name in state and bool((state[name][~mask] != 0).any())]
    if bad:
        raise MaskViolation(f"epoch {epoch}: pruned weights became non-zero under FSDP in {', '.join(bad)}")


def _fingerprint(model: nn.Module, masks: Masks, windows: torch.Tensor, settings: TrainSettings,
                 eval_spec: EvalSpec | None) -> str:
    """Identify the job (starting weights, masks, data, optimisation settings) so a run name
    reused for another job is refused instead of silently resumed. Epoch count, keep_best and
    patience are left out: raising the epochs of a finished run is a legitimate resume."""
    digest = hashlib.blake2b(digest_size=16)

    def add(value: Any) -> None:
        digest.update(repr(value).encode())

    add((type(model).__name__, model.config.to_json_string() if hasattr(model.config, "to_json_string") else ""))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            add((name, tuple(tensor.shape), f"{float(tensor.double().sum()):.6e}",
                 f"{float(tensor.double().abs().sum()):.6e}"))
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].detach().cpu().bool().contiguous().numpy().tobytes())
    digest.update(windows.detach().cpu().contiguous().numpy().tobytes())
    tuning = {k: v for k, v in dataclasses.asdict(settings).items()
              if k not in ("epochs", "keep_best", "early_stopping_patience")}
    add(sorted(tuning.items()))
    if eval_spec is not None:
        add((eval_spec.seqlen, eval_spec.stride, eval_spec.max_windows, eval_spec.stream.numel()))
        digest.update(eval_spec.stream.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
