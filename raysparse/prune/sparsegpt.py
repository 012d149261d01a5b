"""SparseGPT (Frantar & Alistarh 2023): prune by approximate second-order reconstruction.

For each linear sublayer with inputs X, the Hessian of ||WX - W'X||^2 is H = 2 X X^T.
Columns are processed left to right in blocks; within a block the mask is chosen by the
OBS saliency w^2 / [H^-1]_jj^2 (adaptive mask selection), and the error of every removed
weight is pushed onto the not-yet-processed columns through the Cholesky factor of H^-1.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from raysparse.models.adapters import ModelAdapter
from raysparse.prune.selection import nm_mask, whole_matrix_mask
from raysparse.sparsity.pattern import SparsityPattern

logger = logging.getLogger(__name__)


class HessianCollector:
    """Accumulates X X^T over calibration tokens (float32) and the token count."""

    def __init__(self, in_features: int, device: torch.device):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.xtx.addmm_(flat.t(), flat)
        self.tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))

    def prepared(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper Cholesky factor of the dampened H^-1, dead inputs), computed once: sublayers
        that share this collector (q/k/v, gate/up) share the factorisation too."""
        cached = getattr(self, "_prepared", None)
        if cached is None or cached[0] != percdamp:
            self._prepared = (percdamp, prepare_hessian(self.hessian(), percdamp))
        return self._prepared[1]


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising the dampening until H is positive definite."""
    mean_diag = float(torch.diag(hessian).mean())
    damp = percdamp
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + eye * (damp * mean_diag))
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            damp = max(damp * 10, 1e-4)
            logger.warning("Hessian not positive definite; retrying with dampening %.4g", damp)
    raise RuntimeError("SparseGPT: the Hessian stayed singular even with 10x dampening; use more --nsamples")


def prepare_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened H^-1, mask of dead inputs); dead inputs (never
    active in calibration) get a unit diagonal so H stays invertible."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return _inverse_cholesky(H, percdamp), dead


@torch.no_grad()
def sparsegpt_reconstruct(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    percdamp: float = 0.01,
    blocksize: int = 128,
    sweep: int = 32,
    prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned and updated weight, remove-mask) for an (out, in) weight.

    `blocksize` is the paper's mask-selection block: an unstructured mask is chosen for
    `blocksize` columns at once from the weights as the earlier blocks left them. The error
    propagation inside a block runs in sub-blocks of `sweep` columns with a lazy (matmul)
    update of the columns after each sub-block: the same sums in another order, so the masks
    are identical to a sweep over the whole block, with a quarter of the column-by-column
    rank-1 work on a CPU. `prepared` is `prepare_hessian(hessian, percdamp)` when the caller
    already has it.
    """
    W = weight.detach().float().clone()
    Hinv, dead = prepared if prepared is not None else prepare_hessian(hessian, percdamp)
    W[:, dead] = 0.0
    rows, cols = W.shape
    remove = torch.zeros_like(W, dtype=torch.bool)
    if pattern.is_nm and blocksize % pattern.m:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    sweep = min(sweep, blocksize)
    if pattern.is_nm:  # an N:M group never straddles two sub-blocks
        sweep = max(pattern.m, sweep - sweep % pattern.m)
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        if not pattern.is_nm:  # adaptive mask selection: OBS saliency w^2 / [H^-1]_jj^2 over the block
            diag = torch.diag(Hinv[b1:b2, b1:b2])
            remove[:, b1:b2] = whole_matrix_mask(W[:, b1:b2].pow(2) / diag.pow(2).unsqueeze(0), pattern.ratio)
        for s1 in range(b1, b2, sweep):
            s2 = min(s1 + sweep, b2)
            W1 = W[:, s1:s2]  # a view: updated in place
            U = Hinv[s1:s2, s1:s2]
            Err1 = torch.empty_like(W1)
            for i in range(s2 - s1):
                column = s1 + i
                if pattern.is_nm and (column - b1) % pattern.m == 0:
                    group = slice(i, min(i + pattern.m, s2 - s1))
                    saliency = W1[:, group].pow(2) / torch.diag(U)[group].pow(2).unsqueeze(0)
                    remove[:, column:s1 + group.stop] = nm_mask(saliency, pattern.n, pattern.m)
                err = W1[:, i].mul(remove[:, column]).div_(U[i, i])  # removed weights' error, 0 elsewhere
                W1[:, i:].addr_(err, U[i, i:], alpha=-1.0)  # column i itself becomes its pruned value
                Err1[:, i] = err
            W[:, s2:].addmm_(Err1, Hinv[s1:s2, s2:], alpha=-1.0)
    W.masked_fill_(remove, 0.0)  # exact zeros (the update leaves rounding dust)
    remove |= dead.unsqueeze(0).expand_as(remove)
    return W, remove


class SparseGPTMethod:
    def __init__(self, pattern: SparsityPattern, percdamp: float = 0.01, blocksize: int = 128):
        self.pattern = pattern
        self.percdamp = percdamp
        self.blocksize = blocksize

    def make_collector(self, module: nn.Module) -> HessianCollector:
        in_features = ModelAdapter.weight_matrix(module).shape[1]
        return HessianCollector(in_features, module.weight.device)

    @torch.no_grad()
    def prune_module(self, adapter: ModelAdapter, module: nn.Module, stats: HessianCollector) -> torch.Tensor:
        weight = adapter.weight_matrix(module)
        new_weight, remove = sparsegpt_reconstruct(
            weight, stats.hessian(), self.pattern, self.percdamp, self.blocksize, prepared=stats.prepared(self.percdamp)
        )
        weight.copy_(new_weight.to(weight.dtype))
        weight.masked_fill_(remove, 0)  # dead inputs and pruned weights are exactly zero
        return remove
