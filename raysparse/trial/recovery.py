"""The recovery dispatch: masked fine-tuning in-process or on Ray Train workers, or LoRA."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from raysparse.config import TrialConfig
from raysparse.models.adapters import get_adapter
from raysparse.models.loading import load_model
from raysparse.recover.distill import DistillSettings, TeacherCost, TeacherOutputCache, distillation_loss
from raysparse.recover.distributed.driver import EvalSpec, train_masked_distributed
from raysparse.recover.loop import EpochRecord, LossFn, TrainSettings, next_token_loss
from raysparse.recover.lora import LoraSettings, train_lora
from raysparse.recover.masked import train_masked
from raysparse.sparsity.masks import Masks
from raysparse.trial.context import TrialContext
from raysparse.trial.state import RAY_TRAIN_DIR


def _train_settings(config: TrialConfig, device: torch.device):

    bf16 = config.bf16 in (True, "true") or (config.bf16 == "auto" and device.type == "cuda"
                                               and torch.cuda.is_bf16_supported())
    return TrainSettings(
        lr=config.effective_lr(), epochs=config.epochs_per_iteration, batch_size=config.batch_size,
        max_steps_per_epoch=config.effective_max_steps(), grad_accum=config.grad_accum,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, bf16=bf16,
        early_stopping_patience=config.early_stopping_patience, keep_best=config.keep_best, seed=config.seed,
    )


def _teacher(ctx: TrialContext) -> torch.nn.Module:
    """The frozen dense model (or --teacher), loaded once per trial in the trial's dtype and device.

    Loaded from its files rather than copied from the trial's model, which is pruned in place
    by the time recovery runs (and on a resumed trial never was dense in this process).
    """
    if ctx.teacher is None:
        config = ctx.config
        with ctx.timer.phase("load_teacher"):
            loaded = load_model(config.teacher or config.model, config.device, config.dtype, config.trust_remote_code)
            ctx.teacher = loaded.model.to(ctx.device).eval()
    return ctx.teacher


def _teacher_cache(ctx: TrialContext) -> TeacherOutputCache:
    """One cache per trial: the teacher and the training windows stay the same across iterations."""
    if ctx.teacher_cache is None:
        ctx.teacher_cache = TeacherOutputCache(len(ctx.train_windows), ctx.config.distill_cache_mb * 2**20)
    return ctx.teacher_cache


def _loss(ctx: TrialContext) -> tuple[LossFn, TeacherCost | None]:
    """The recovery loss: next-token, or distillation from the teacher (with its cost counted)."""
    config = ctx.config
    if config.distill == "none":
        return next_token_loss, None
    teacher, cost = _teacher(ctx), TeacherCost()
    student_layers = list(get_adapter(ctx.loaded.model).decoder_layers())  # peft wraps inside these modules
    return distillation_loss(teacher, _distill_settings(config), lambda _model: student_layers,
                             list(get_adapter(teacher).decoder_layers()), cost, _teacher_cache(ctx)), cost


def _distill_settings(config: TrialConfig) -> DistillSettings:
    return DistillSettings(config.distill, config.distill_weight, config.distill_temperature,
                           config.distill_layer_indices)


def _distill_record(ctx: TrialContext, cost: TeacherCost | None) -> dict[str, Any]:
    if cost is None:
        return {}
    config = ctx.config
    return {"distill": {"mode": config.distill, "teacher": config.teacher or "the dense model",
                        "weight": config.distill_weight, "temperature": config.distill_temperature,
                        "layers": config.distill_layers or "all", "teacher_forwards": cost.forwards,
                        "teacher_reused": cost.reused, "teacher_s": round(cost.seconds, 3),
                        "teacher_outputs": ctx.teacher_cache.describe(cost) if ctx.teacher_cache is not None
                        else "recomputed every step"}}


def _recover(ctx: TrialContext, masks: Masks, iteration: int, ppl_after_prune: float,
             on_epoch: Callable[[EpochRecord], None] | None = None) -> dict[str, Any]:
    """Run the configured recovery; return what the iteration record needs.

    `on_epoch` hears every epoch of in-process training (Ray Train workers report at the end).
    """
    config = ctx.config
    settings = _train_settings(config, ctx.device)
    hooks = {"on_epoch_end": on_epoch} if on_epoch is not None else {}
    if config.recovery == "lora":
        loss_fn, teacher_cost = _loss(ctx)

        adapter_dir = Path(config.output) / "adapters" / f"iter_{iteration:03d}" if config.output else None
        outcome = train_lora(
            ctx.loaded.model, masks, ctx.train_windows, settings,
            LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets),
            lambda model: ctx.evaluate(model, "perplexity (LoRA)"), adapter_dir=adapter_dir,
            device=ctx.device, baseline_ppl=ppl_after_prune, loss_fn=loss_fn, **hooks,
        )
        ctx.loaded.model = outcome.model
        ctx.loaded.adapter = get_adapter(outcome.model)
        return {"train": outcome.train, "ppl_after_train": outcome.ppl_masked_merge,
                "ppl_with_adapter": outcome.ppl_with_adapter, "adapter_dir": outcome.adapter_dir,
                **_distill_record(ctx, teacher_cost)}
    if config.workers > 1:

        # A search puts these on its storage (possibly a URI), where a retry on another node finds them.
        storage = config.ray_train_storage or (
            str(Path(config.output).resolve() / RAY_TRAIN_DIR) if config.output else tempfile.mkdtemp())
        result = train_masked_distributed(
            ctx.loaded.model, masks, ctx.train_windows, settings,
            EvalSpec(ctx.val_stream, ctx.settings.eval_seqlen, ctx.settings.eval_stride,
                     config.eval_batch_size, config.eval_max_windows, config.eval_max_tokens),
            workers=config.workers, storage_path=storage, run_name=f"recovery-iter{iteration:03d}",
            retries=config.worker_retries,
            use_gpu=ctx.device.type == "cuda",
            teacher=_teacher(ctx) if config.distill != "none" else None, distill=_distill_settings(config),
        )
        record = _distill_record(ctx, TeacherCost() if config.distill != "none" else None)
        if record:  # the workers ran the teacher: one forward per batch on every worker, not timed apart
            record["distill"].update(teacher_forwards=sum(e.batches for e in result.epochs) * config.workers,
                                     teacher_reused=0, teacher_s=None, teacher_outputs="recomputed every step, "
                                     "sharded over the workers like the student (a sharded forward is collective)")
        return {"train": result, "ppl_after_train": result.final_ppl, "workers": config.workers, **record}

    loss_fn, teacher_cost = _loss(ctx)
    result = train_masked(ctx.loaded.model, masks, ctx.train_windows, settings,
                          lambda: ctx.evaluate(desc="perplexity (epoch)"), device=ctx.device,
                          baseline_ppl=ppl_after_prune, loss_fn=loss_fn, **hooks)
    return {"train": result, "ppl_after_train": result.final_ppl, **_distill_record(ctx, teacher_cost)}


def recovery_pct(before: float, after_prune: float, after_train: float) -> float | None:
    """Share of the perplexity lost to pruning that training won back (100 = all of it)."""
    lost = after_prune - before
    if not math.isfinite(lost) or lost <= 0:
        return None
    return 100.0 * (after_prune - after_train) / lost
