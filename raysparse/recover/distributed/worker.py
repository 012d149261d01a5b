"""What each Ray Train worker runs: rebuild the model, shard it with FSDP2, train with mask hooks,
evaluate and checkpoint every epoch (rank 0 writes the full state dict)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from raysparse.errors import RaysparseError
from raysparse.metrics.perplexity import perplexity
from raysparse.models.adapters import get_adapter
from raysparse.recover.distill import distillation_loss
from raysparse.recover.distributed.job import TeacherJob, _Job
from raysparse.recover.distributed.weights import (
    META_FILE,
    _check_state_masks,
    _dedupe,
    _is_tied,
    _read_weights,
    _write_weights,
)
from raysparse.recover.loop import EpochRecord, LossFn, TrainingDiverged, fit, next_token_loss
from raysparse.recover.masked import mask_hooks
from raysparse.sparsity.masks import MaskViolation

logger = logging.getLogger(__name__)


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

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job: _Job = ray.get(config["job"])
    if job.error_file and Path(job.error_file).is_file():
        # A restart after a NaN loss, a mask violation or a bad setting: it would repeat. Stop
        # here; the driver raises the recorded error once `fit` returns.
        if rank == 0:
            logger.info("an earlier attempt of this run failed for good (%s): not retrying", job.error_file)
        return
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
    loss_fn = _loss(job, config.get("teacher_state"), model, device, world)
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
                              device=device, desc=f"perplexity rank {rank}", progress=False,
                              max_tokens=spec.max_tokens).ppl

    if checkpoint is None and evaluate is not None:
        baseline = evaluate()
    if rank == 0 and start_epoch:
        logger.info("resuming after epoch %d of %d", start_epoch, settings.epochs)

    def on_epoch_end(record: EpochRecord) -> None:
        # Every rank saw other windows: the epoch's loss is the mean over ranks. Rank 0's
        # early-stopping decision is shared so that all ranks leave together.
        records.append(record)
        stop = _patience_ran_out(baseline, records, job.settings.early_stopping_patience)
        parts = sorted(record.loss_parts or {})
        shared = torch.tensor([record.avg_loss, float(stop and rank == 0)] + [record.loss_parts[p] for p in parts],
                              dtype=torch.float64, device=device)
        dist.all_reduce(shared)
        record.avg_loss = float(shared[0]) / world
        stop = bool(shared[1] > 0)
        if parts:
            record.loss_parts = {part: float(value) / world for part, value in zip(parts, shared[2:])}
        sessions[-1]["epochs"].append(record.epoch)
        _report_epoch(model, job, records, baseline, sessions, stop, rank)
        if stop:
            raise _StopEarly

    try:
        fit(model, [p for p in model.parameters()], local_windows, settings, evaluate,
            after_backward=after_backward, after_step=after_step, on_epoch_end=on_epoch_end, device=device,
            desc=f"masked fine-tuning rank {rank}", progress=False, start_epoch=start_epoch, baseline_ppl=baseline,
            loss_fn=loss_fn)
    except (TrainingDiverged, RaysparseError, MaskViolation) as exc:
        _record_worker_error(job.error_file, exc)
        raise
    except _StopEarly:
        if rank == 0:
            logger.info("early stop after epoch %d: no improvement for %d epochs", records[-1].epoch,
                        job.settings.early_stopping_patience)


def _loss(job: _Job, teacher_ref: Any, model: nn.Module, device: torch.device, world: int) -> LossFn:
    """Next-token loss, or distillation from a teacher rebuilt here and sharded like the student
    (so the teacher adds 1/world of its weights to each worker's memory, not all of them)."""
    if job.teacher is None or teacher_ref is None:
        return next_token_loss
    import ray

    teacher = _build_model(job.teacher, ray.get(teacher_ref))
    teacher.to(device)
    # The decoder layers, found before sharding: FSDP keeps the modules, so hooks on them still fire.
    student_layers = list(get_adapter(model).decoder_layers())
    teacher_layers = list(get_adapter(teacher).decoder_layers())
    _shard(teacher, device, world)
    return distillation_loss(teacher, job.teacher.distill, lambda _model: student_layers, teacher_layers)


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


def _build_model(job: "_Job | TeacherJob", state: dict[str, torch.Tensor]) -> nn.Module:
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

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 ships FSDP2 under its composable namespace only
        from torch.distributed._composable.fsdp import fully_shard

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
