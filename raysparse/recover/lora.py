"""LoRA recovery (peft) with a merge that keeps the model exactly as sparse as it was.

A plain `merge_and_unload` adds B·A to every weight, filling pruned positions with the
low-rank product. The masked merge adds the product only where the weight survived, so
the merged model keeps its sparsity; both perplexities (adapter attached, and after the
masked merge) are reported, since the masked merge loses part of what LoRA learned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from raysparse.errors import ConfigError
from raysparse.recover.loop import TrainResult, TrainSettings, fit
from raysparse.sparsity.masks import Masks, apply_masks

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LoraOutcome:
    model: nn.Module  # the merged, plain transformers model
    train: TrainResult
    ppl_with_adapter: float | None
    ppl_masked_merge: float | None
    adapter_dir: str | None


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Name the available linear layers when a target does not exist (peft's error is cryptic)."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                           if isinstance(mod, nn.Linear) and name})
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise ConfigError(
            f"LoRA target module(s) {', '.join(missing)} not found in the model; available linear "
            f"layers: {', '.join(linear_names)}"
        )


def train_lora(
    model: nn.Module,
    masks: Masks,
    windows: torch.Tensor,
    settings: TrainSettings,
    lora: LoraSettings,
    evaluate: Callable[[nn.Module], float] | None,
    adapter_dir: str | Path | None = None,
    **fit_kwargs,
) -> LoraOutcome:
    """Train a LoRA adapter on a pruned model, save it, merge it back under the masks."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, lora.target_modules)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, peft_config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    result = fit(peft_model, trainable, windows, settings,
                 (lambda: evaluate(peft_model)) if evaluate else None, desc="LoRA", **fit_kwargs)
    ppl_with_adapter = result.final_ppl
    saved = None
    if adapter_dir is not None:
        peft_model.save_pretrained(str(adapter_dir))
        saved = str(adapter_dir)
    merged = peft_model.merge_and_unload()
    apply_masks(merged, masks)  # the masked merge: pruned positions return to exactly zero
    ppl_merged = evaluate(merged) if evaluate else None
    logger.info("LoRA: ppl with adapter %s, after masked merge %s", ppl_with_adapter, ppl_merged)
    return LoraOutcome(merged, result, ppl_with_adapter, ppl_merged, saved)
