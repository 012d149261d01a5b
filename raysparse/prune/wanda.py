"""Wanda (Sun et al. 2023): score = |W_ij| * ||X_j||_2, compared within each output row.

Needs one forward pass of calibration data and no weight update, which is why it is the
fast calibration-based baseline.
"""
from __future__ import annotations

import torch
from torch import nn

from raysparse.models.adapters import ModelAdapter
from raysparse.prune.selection import prune_mask
from raysparse.sparsity.pattern import SparsityPattern


class InputNormCollector:
    """Running sum of squared inputs per input feature (the squared column norms of X)."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sq_norms += flat.pow(2).sum(dim=0)
        self.tokens += flat.shape[0]


class WandaMethod:
    def __init__(self, pattern: SparsityPattern):
        self.pattern = pattern

    def make_collector(self, module: nn.Module) -> InputNormCollector:
        in_features = ModelAdapter.weight_matrix(module).shape[1]
        return InputNormCollector(in_features, module.weight.device)

    @torch.no_grad()
    def prune_module(self, adapter: ModelAdapter, module: nn.Module, stats: InputNormCollector) -> torch.Tensor:
        weight = adapter.weight_matrix(module)
        scores = weight.abs().float() * stats.sq_norms.sqrt().unsqueeze(0)
        remove = prune_mask(scores, self.pattern, per_row=True)
        weight.masked_fill_(remove, 0)
        return remove
