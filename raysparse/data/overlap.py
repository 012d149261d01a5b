"""How much of the test text another stream already contains.

Selecting on validation text only keeps the reported test number unbiased when the two are
really different text; the same goes for calibration and training text, which the model is
fitted to. A user who points `--val-data` and `--eval-data` at overlapping files (or a
preset whose splits leak) gets a refusal, not a quietly optimistic result. Overlap is
measured on token k-grams: the share of the test stream's k-grams that also occur in the
other stream. Natural text shares short phrases, so k is long (64 tokens) and a small share
is tolerated.
"""
from __future__ import annotations

import numpy as np
import torch

KGRAM = 64
MAX_SHARED = 0.01  # refuse when more than 1% of the test k-grams occur in the other text


def _kgram_hashes(stream: torch.Tensor, k: int) -> np.ndarray:
    tokens = stream.to(torch.int64).numpy()
    if tokens.size < k:
        return np.empty(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, k)
    # A polynomial hash with wrapping int64 arithmetic: cheap, and collisions are harmless
    # here (they could only overstate overlap by a negligible amount).
    weights = np.power(np.int64(1_000_003), np.arange(k, dtype=np.int64))
    with np.errstate(over="ignore"):
        return windows @ weights


def shared_fraction(other: torch.Tensor, test: torch.Tensor, k: int = KGRAM) -> float:
    """Share of `test`'s k-grams that also occur in `other` (0 = disjoint, 1 = contained)."""
    test_hashes = _kgram_hashes(test, k)
    if test_hashes.size == 0:
        return 0.0
    other_hashes = _kgram_hashes(other, k)
    if other_hashes.size == 0:
        return 0.0
    return float(np.isin(test_hashes, other_hashes).mean())
