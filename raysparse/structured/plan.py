"""GQA-aware structured pruning with first-order Taylor importance (LLM-Pruner style).

Units removed as a whole (see `ModelAdapter.attention_units` / `mlp_units`):

- attention: one key/value group = a kv head, every query head that shares it, and their
  o_proj input columns (MHA families: each head is its own group). Removing a query head
  but keeping its kv head (or the reverse) would break the GQA repeat pattern that
  transformers' attention relies on, so groups are the finest safe unit;
- MLP: one intermediate channel = a row of gate/up (fc1) and a column of down (fc2).

A unit's importance is ``sum |w * dL/dw|`` over its weights, with the gradient of the mean
next-token loss over `num_examples` windows of `max_seq_len` tokens: the first-order
estimate of the loss change if the unit were removed. Scores depend only on the dense
model and the data, so a search computes them once and shares them.

Per layer, the requested ratio is a fraction of the layer's prunable parameters. Attention
groups are coarse (a Llama-3-8B layer has 8), so the layer removes ``round(ratio * groups)``
groups and then as many MLP channels as make the layer's removed parameters match the ratio
to within one channel: every layer, and so the model, lands on its target.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from raysparse.errors import ConfigError
from raysparse.models.adapters import ModelAdapter
from raysparse.models.resize import shrink_layer, unit_params
from raysparse.structured.taylor import LayerUnitScores, logger


@dataclass
class LayerPlan:
    """What structured pruning does to one decoder layer (reported in the summary)."""

    layer: int
    ratio_target: float
    groups_before: int
    groups_removed: int
    heads_before: int
    heads_after: int
    channels_before: int
    channels_removed: int
    params_before: int
    params_removed: int

    @property
    def ratio_achieved(self) -> float:
        return self.params_removed / self.params_before if self.params_before else 0.0


@dataclass
class StructuredResult:
    plans: list[LayerPlan] = field(default_factory=list)
    taylor_seconds: float = 0.0

    @property
    def params_before(self) -> int:
        return sum(p.params_before for p in self.plans)

    @property
    def params_removed(self) -> int:
        return sum(p.params_removed for p in self.plans)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [dict(asdict(p), ratio_achieved=p.ratio_achieved) for p in self.plans],
            "params_in_range_before": self.params_before,
            "params_in_range_removed": self.params_removed,
            "ratio_achieved": self.params_removed / self.params_before if self.params_before else 0.0,
            "taylor_seconds": round(self.taylor_seconds, 3),
        }


def plan_layer(layer: int, ratio: float, scores: LayerUnitScores, group_params: int, channel_params: int,
               queries_per_group: int) -> tuple[LayerPlan, torch.Tensor, torch.Tensor]:
    """Choose the groups and channels one layer loses; return its plan and the units to keep."""
    groups, channels = len(scores.attention), len(scores.mlp)
    params_before = groups * group_params + channels * channel_params
    budget = ratio * params_before
    remove_groups = min(max(int(round(ratio * groups)), 0), groups - 1)
    remove_channels = int(round((budget - remove_groups * group_params) / channel_params))
    remove_channels = min(max(remove_channels, 0), channels - 1)
    keep_groups = torch.sort(torch.argsort(torch.tensor(scores.attention), descending=True)[:groups - remove_groups]).values
    keep_channels = torch.sort(torch.argsort(torch.tensor(scores.mlp), descending=True)[:channels - remove_channels]).values
    plan = LayerPlan(
        layer=layer, ratio_target=ratio, groups_before=groups, groups_removed=remove_groups,
        heads_before=groups * queries_per_group, heads_after=(groups - remove_groups) * queries_per_group,
        channels_before=channels, channels_removed=remove_channels,
        params_before=params_before, params_removed=remove_groups * group_params + remove_channels * channel_params,
    )
    return plan, keep_groups, keep_channels


def prune_structured(adapter: ModelAdapter, scores: Sequence[LayerUnitScores],
                     ratios: Sequence[float]) -> StructuredResult:
    """Shrink every scored layer to its ratio (one ratio per entry of `scores`), in place."""
    if len(scores) != len(ratios):
        raise ValueError(f"{len(ratios)} ratios for {len(scores)} scored layers")
    layers = adapter.decoder_layers()
    queries_per_group = adapter.attention_shape().queries_per_group
    result = StructuredResult()
    for layer_scores, ratio in zip(scores, ratios):
        if not 0.0 <= ratio < 1.0 or not math.isfinite(ratio):
            raise ConfigError(f"layer {layer_scores.layer}: pruning ratio {ratio} is outside [0, 1)")
        layer = layers[layer_scores.layer]
        att, mlp = adapter.attention_units(layer), adapter.mlp_units(layer)
        if (att.count, mlp.count) != (len(layer_scores.attention), len(layer_scores.mlp)):
            raise ConfigError(f"layer {layer_scores.layer}: the Taylor scores do not match the model "
                              "(were they computed for another model?)")
        plan, keep_groups, keep_channels = plan_layer(
            layer_scores.layer, ratio, layer_scores, unit_params(adapter, layer, att), unit_params(adapter, layer, mlp),
            queries_per_group)
        shrink_layer(adapter, layer, keep_groups, keep_channels)
        result.plans.append(plan)
    logger.info("structured pruning removed %d of %d parameters in %d layers (%.4f)", result.params_removed,
                result.params_before, len(result.plans),
                result.params_removed / max(result.params_before, 1))
    return result
