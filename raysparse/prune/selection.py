"""Turn importance scores into prune masks for each sparsity pattern.

Shared by every pruner so that "50%" and "2:4" mean exactly the same thing whichever
method scored the weights. Masks returned here are True where a weight is *removed*.
"""
from __future__ import annotations

import torch

from raysparse.sparsity.pattern import SparsityPattern


def per_row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove the lowest-scoring `int(in * ratio)` weights of every output row (Wanda's group)."""
    k = int(scores.shape[1] * ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def whole_matrix_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove the lowest-scoring `int(numel * ratio)` weights of the matrix (one threshold)."""
    k = int(scores.numel() * ratio)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the `n` lowest-scoring weights of every `m` consecutive inputs of each row.

    When the input width is not a multiple of `m` (e.g. 172 channels with 4:8), the last,
    shorter group loses round(n * width / m) weights so the overall ratio stays n/m.
    """
    rows, cols = scores.shape
    full = cols - cols % m
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if full:
        grouped = scores[:, :full].reshape(rows, full // m, m)
        idx = torch.topk(grouped, n, dim=2, largest=False).indices
        mask[:, :full] = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
    tail = cols - full
    if tail:
        k = round(n * tail / m)
        if k:
            idx = torch.topk(scores[:, full:], k, dim=1, largest=False).indices
            mask[:, full:] = torch.zeros_like(scores[:, full:], dtype=torch.bool).scatter_(1, idx, True)
    return mask


def prune_mask(scores: torch.Tensor, pattern: SparsityPattern, per_row: bool = True) -> torch.Tensor:
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return per_row_mask(scores, pattern.ratio) if per_row else whole_matrix_mask(scores, pattern.ratio)
