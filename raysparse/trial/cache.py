"""Statistics computed once per key and shared by every trial of a search.

Dense-model statistics (the unpruned perplexity today; layer importance and first-layer
activations as they land) depend only on model, data, window, sample count and seed, yet
every trial of a search would recompute them. A named Ray actor, created by the search
driver (an actor created inside a trial dies with it), tracks which keys exist and which
are being computed, so concurrent trials wait for one computation instead of racing; the
values themselves live on disk under the storage root, so a resumed search and a new
search with the same key reuse them, and a trial running without Ray (launch/prune.py)
reads the same files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

logger = logging.getLogger(__name__)

ACTOR_NAME = "raysparse-stats-cache"

T = TypeVar("T")


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a statistic."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    computed_s: float = 0.0
    saved_s: float = 0.0


class CacheCoordinator:
    """Actor body: which keys are being computed, and the hit/miss accounting."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.in_progress: dict[str, float] = {}
        self.stats = CacheStats()

    def claim(self, key: str) -> str:
        """'hit' (value on disk), 'compute' (caller computes it), or 'wait' (someone else is)."""
        if (self.directory / f"{key}.pt").is_file():
            return "hit"
        if key in self.in_progress:
            return "wait"
        self.in_progress[key] = time.time()
        return "compute"

    def record(self, key: str, outcome: str, seconds: float) -> None:
        if outcome == "computed":
            self.in_progress.pop(key, None)
            self.stats.misses += 1
            self.stats.computed_s += seconds
        else:
            self.stats.hits += 1
            self.stats.saved_s += seconds

    def release(self, key: str) -> None:
        """The computing trial failed: let the next asker compute it."""
        self.in_progress.pop(key, None)

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats.__dict__)


def actor_name(directory: str | Path) -> str:
    """One coordinator per cache folder, so two searches with different storage never mix."""
    return f"{ACTOR_NAME}-{hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:12]}"


def start_coordinator(directory: str | Path):
    """Create (or find) the named coordinator actor on the caller's node.

    Call it from the search driver: an actor created inside a trial lives in the trial's
    placement group and dies with it. It is pinned to the driver's node because that node
    lives as long as the search; placed on a worker that is then lost, every trial's next
    cache call (and so the search) would fail with ActorDiedError (seen in the node-kill test).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(directory).mkdir(parents=True, exist_ok=True)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0)(CacheCoordinator)
    return remote.options(name=actor_name(directory), get_if_exists=True,
                          scheduling_strategy=here).remote(str(directory))


class StatsCache:
    """Client used inside a trial: `get_or_compute(parts, fn)`; works with or without Ray."""

    def __init__(self, directory: str | Path, use_actor: bool = True, poll_s: float = 0.2):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self.actor = self._find_actor(self.directory) if use_actor else None
        self.events: list[dict[str, Any]] = []

    @staticmethod
    def _find_actor(directory: Path):
        try:
            import ray

            if not ray.is_initialized():
                return None
            return ray.get_actor(actor_name(directory))
        except (ValueError, ImportError):
            return None

    def _load(self, key: str) -> tuple[Any, float]:
        payload = torch.load(self.directory / f"{key}.pt", weights_only=False)
        return payload["value"], payload["seconds"]

    def _store(self, key: str, parts: dict[str, Any], value: Any, seconds: float) -> None:
        tmp = self.directory / f".{key}.{os.getpid()}.tmp"
        torch.save({"value": value, "seconds": seconds, "key": parts}, tmp)
        tmp.replace(self.directory / f"{key}.pt")

    def get_or_compute(self, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        key = cache_key(parts)
        while True:
            state = self._claim(key)
            if state == "hit":
                value, seconds = self._load(key)
                self._note(parts, "hit", seconds)
                return value
            if state == "compute":
                break
            time.sleep(self.poll_s)  # another trial is computing this key
        started = time.perf_counter()
        try:
            value = compute()
        except BaseException:
            if self.actor is not None:
                self.actor.release.remote(key)
            raise
        seconds = time.perf_counter() - started
        self._store(key, parts, value, seconds)
        self._note(parts, "computed", seconds, key)
        return value

    def _claim(self, key: str) -> str:
        if self.actor is None:  # no search driver: the files alone (no cross-process waiting)
            return "hit" if (self.directory / f"{key}.pt").is_file() else "compute"
        import ray

        return ray.get(self.actor.claim.remote(key))

    def _note(self, parts: dict[str, Any], outcome: str, seconds: float, key: str | None = None) -> None:
        self.events.append({"kind": parts.get("kind"), "outcome": outcome, "seconds": round(seconds, 3)})
        if self.actor is not None:
            import ray

            ray.get(self.actor.record.remote(key or cache_key(parts), outcome, seconds))
        logger.info("stats cache %s: %s (%.2fs)", outcome, parts.get("kind"), seconds)
