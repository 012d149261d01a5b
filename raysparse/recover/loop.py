"""The recovery training loop shared by masked fine-tuning, LoRA and Ray Train workers.

One loop so that a trial trains identically whether it runs in-process, inside a Tune
trial, or sharded over FSDP workers: the callers differ only in which parameters train
and what happens after backward / after each optimizer step (masking gradients and
re-zeroing pruned weights for masked training; nothing for LoRA, whose base is frozen).
"""
from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: the trial must stop and report it instead of saving garbage."""


# (model, batch of token ids) -> (loss to minimise, named parts of it for the history)
LossFn = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain recovery: the causal language-modelling loss on the training windows."""
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    return loss, {"next_token": float(loss.detach())}


@dataclass
class TrainSettings:
    """Optimisation settings of one recovery run (per pruning iteration)."""

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    max_steps_per_epoch: int | None = None
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    bf16: bool = False
    early_stopping_patience: int | None = None
    keep_best: bool = True
    seed: int = 0


@dataclass
class EpochRecord:
    epoch: int
    avg_loss: float
    steps: int
    batches: int
    ppl: float | None
    change_vs_baseline_pct: float | None
    time_s: float
    memory_mb: float
    loss_parts: dict[str, float] | None = None  # mean of each named part of the loss (distillation)


@dataclass
class TrainResult:
    baseline_ppl: float | None
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    best_ppl: float | None = None
    final_ppl: float | None = None
    steps: int = 0
    stopped_early: bool = False

    @property
    def train_loss(self) -> float | None:
        return self.epochs[-1].avg_loss if self.epochs else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["train_loss"] = self.train_loss
        return data


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches_for_epoch(windows: torch.Tensor, batch_size: int, epoch: int, seed: int) -> Iterable[torch.Tensor]:
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for start in range(0, len(order), batch_size):
        yield windows[order[start : start + batch_size]]


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    windows: torch.Tensor,
    settings: TrainSettings,
    evaluate: Callable[[], float] | None,
    after_backward: Callable[[], None] = lambda: None,
    after_step: Callable[[], None] = lambda: None,
    on_epoch_end: Callable[[EpochRecord], None] = lambda record: None,
    device: torch.device | None = None,
    desc: str = "recovery",
    progress: bool = True,
    start_epoch: int = 0,
    baseline_ppl: float | None = None,
    loss_fn: LossFn = next_token_loss,
) -> TrainResult:
    """Train `params` on `windows` (rows of token ids) with AdamW; evaluate after every epoch.

    `loss_fn` gives the loss of a batch (next-token by default; distillation mixes in a teacher).
    """
    device = device or next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(windows.shape[0] / settings.batch_size / settings.grad_accum)
    if settings.max_steps_per_epoch:
        per_epoch = min(per_epoch, settings.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
    )
    if baseline_ppl is None and evaluate is not None:
        baseline_ppl = evaluate()
    result = TrainResult(baseline_ppl=baseline_ppl, best_ppl=baseline_ppl, best_epoch=0 if baseline_ppl else None)
    best_state = _snapshot(model) if settings.keep_best and baseline_ppl is not None else None
    bad_epochs = 0
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    for epoch in range(start_epoch, settings.epochs):
        model.train()
        started = time.perf_counter()
        losses: list[float] = []
        part_sums: dict[str, float] = {}
        steps = batches = 0
        bar = tqdm(total=per_epoch, desc=f"{desc} epoch {epoch + 1}/{settings.epochs}", disable=not progress, leave=False)
        for batch in batches_for_epoch(windows, settings.batch_size, epoch, settings.seed):
            batch = batch.to(device)
            with autocast:
                loss, parts = loss_fn(model, batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss became {loss_value} at epoch {epoch + 1}, step {steps + 1}")
            (loss / settings.grad_accum).backward()
            losses.append(loss_value)
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value
            batches += 1
            if batches % settings.grad_accum:
                continue
            after_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            after_step()
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if steps >= per_epoch:
                break
        bar.close()
        model.eval()
        ppl = evaluate() if evaluate is not None else None
        record = EpochRecord(
            epoch=epoch + 1, avg_loss=sum(losses) / max(len(losses), 1), steps=steps, batches=batches, ppl=ppl,
            change_vs_baseline_pct=(100.0 * (ppl - baseline_ppl) / baseline_ppl) if ppl and baseline_ppl else None,
            time_s=round(time.perf_counter() - started, 3), memory_mb=round(memory_mb(device), 1),
            loss_parts={name: total / max(batches, 1) for name, total in part_sums.items()} if len(part_sums) > 1
            else None,
        )
        result.epochs.append(record)
        result.steps += steps
        result.final_ppl = ppl
        logger.info("%s epoch %d: loss %.4f ppl %s", desc, epoch + 1, record.avg_loss, f"{ppl:.4f}" if ppl else "-")
        on_epoch_end(record)
        if ppl is None:
            continue
        if result.best_ppl is None or ppl < result.best_ppl:
            result.best_ppl, result.best_epoch, bad_epochs = ppl, epoch + 1, 0
            if settings.keep_best:
                best_state = _snapshot(model)
            continue
        bad_epochs += 1
        if settings.early_stopping_patience and bad_epochs >= settings.early_stopping_patience:
            result.stopped_early = True
            logger.info("%s: early stop after %d epochs without improvement", desc, bad_epochs)
            break
    last_epoch = result.epochs[-1].epoch if result.epochs else None
    if best_state is not None and result.best_epoch != last_epoch:
        model.load_state_dict(best_state)
        result.final_ppl = result.best_ppl
        logger.info("%s: restored the best state (epoch %s, ppl %.4f)", desc, result.best_epoch, result.best_ppl)
    return result


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (local shards under FSDP), to restore the best epoch."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
