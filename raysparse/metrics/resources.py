"""Wall time per phase and peak memory: what a trial reports about its own cost."""
from __future__ import annotations

import platform
import resource
import time
from contextlib import contextmanager
from typing import Iterator

import torch


class PhaseTimer:
    """Wall time per named phase, so users see where an hour went."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if platform.system() != "Darwin" else rss_kb / 2**20
