"""Values computed once per key and shared by every trial of a search (and later searches).

Dense-model statistics (perplexity, layer importance, Taylor scores) and one-shot pruning
results (masks) depend only on model, data and method settings, yet every trial would
recompute them. Inside a search a coordinator actor (cache_coordinator) owns each value in
Ray's object store and leases each missing key to one trial; trials get an ObjectRef and
read it zero-copy, so no shared filesystem is needed. Values are written through to the
search's storage (a folder or a pyarrow URI) in safe formats (cache_store), so a resumed
search, a later search and `launch/prune.py --stats-cache DIR` (which reads and writes the
same entries without Ray) reuse them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from raysparse.errors import ConfigError
from raysparse.trial.cache_coordinator import LEASE_S, MAX_WAIT_S, CacheCoordinator
from raysparse.trial.cache_store import CacheEntryError, EntryStore, cache_key, decode, encode, is_uri

__all__ = ["CacheCoordinator", "StatsCache", "cache_key", "start_coordinator", "stop_coordinator"]

logger = logging.getLogger(__name__)

ACTOR_NAME = "raysparse-stats-cache"

WAIT_LOG_S = 30.0  # a waiting trial says so this often

T = TypeVar("T")


def _location(location: str | Path) -> str:
    return str(location).rstrip("/") if is_uri(str(location)) else str(Path(location).expanduser().resolve())


def actor_name(location: str | Path) -> str:
    """One coordinator per cache location, so two searches with different storage never mix."""
    return f"{ACTOR_NAME}-{hashlib.sha256(_location(location).encode()).hexdigest()[:12]}"


def start_coordinator(location: str | Path, memory_bytes: int = 1 << 30, lease_s: float = LEASE_S,
                      max_wait_s: float = MAX_WAIT_S):
    """Create (or find) the named coordinator actor on the caller's node.

    Call it from the search driver: an actor created inside a trial lives in the trial's
    placement group and dies with it. It is pinned to the driver's node because that node
    lives as long as the search; placed on a worker that is then lost, every cached value
    (owned by the coordinator) and every trial's next cache call would be lost with it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_concurrency=16)(CacheCoordinator)
    handle = remote.options(name=actor_name(location), get_if_exists=True, scheduling_strategy=here).remote(
        _location(location), int(memory_bytes), lease_s, max_wait_s)
    try:
        ray.get(handle.get_stats.remote())  # a storage it cannot open fails here, not in every trial
    except ray.exceptions.RayActorError as exc:
        raise ConfigError(f"cannot start the cache on {location}: {str(exc).strip().splitlines()[-1]}") from None
    return handle


def stop_coordinator(handle, location: str | Path, timeout_s: float = 10.0) -> None:
    """End the coordinator (its values leave the object store; storage keeps them) and wait
    until its name is free, so the next search starts a fresh one instead of finding it dying."""
    import ray

    ray.kill(handle)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor_name(location))
        except ValueError:
            return
        time.sleep(0.1)


@dataclass
class KindCounts:
    """One trial's use of one kind of cached value."""

    hits: int = 0
    computes: int = 0
    compute_s: float = 0.0  # seconds this trial spent computing
    saved_s: float = 0.0  # computation seconds of what it was served, less the serving time
    served_s: float = 0.0


class _Heartbeat:
    """Renews a lease from a background thread while the value is computed and published."""

    def __init__(self, actor, key: str, lease: str, every_s: float):
        self.actor, self.key, self.lease, self.every_s = actor, key, lease, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raysparse-cache-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.actor.heartbeat.remote(self.key, self.lease)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=self.every_s + 1)


@dataclass
class StatsCache:
    """Client used inside a trial: `get_or_compute(parts, fn)`; works with or without Ray.

    With a coordinator for `location` (a search), values come from and go to it. Without
    (launch/prune.py, or a Ray session that started none), the entries on `location` are
    read and written directly, with no waiting on other processes.
    """

    location: str | Path
    use_actor: bool = True
    poll_s: float = 0.5
    events: list[dict[str, Any]] = field(default_factory=list)
    actor: Any = field(default=None, init=False, repr=False)  # the coordinator's handle, in a search
    _store: EntryStore | None = field(default=None, init=False, repr=False)  # the entries, without one

    def __post_init__(self) -> None:
        self.actor = self._find_actor() if self.use_actor else None
        if self.actor is None:
            self._store = self._open_store()

    def _find_actor(self):
        try:
            import ray

            if not ray.is_initialized():
                return None
            return ray.get_actor(actor_name(self.location))
        except (ValueError, ImportError):
            return None

    def _open_store(self) -> EntryStore:
        try:
            return EntryStore(str(self.location))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad paths/URIs
            raise ConfigError(f"cannot open the statistics cache {self.location}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def get_or_compute(self, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        """The value for `parts`: served if any process computed it, else computed here and shared."""
        if self.actor is not None:
            import ray

            try:
                return self._shared(parts, compute)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                logger.warning("cache: the coordinator or its value is gone; %s and later values are read from "
                               "and written to %s directly", parts.get("kind"), self.location)
                self.actor = None  # from now on as without a coordinator: the entries on storage
                self._store = self._open_store()
        return self._local(parts, compute)

    def _computed(self, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        started = time.perf_counter()
        value = compute()
        self._note(parts, "computed", time.perf_counter() - started)
        return value

    def _local(self, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        assert self._store is not None
        key = cache_key(parts)
        started = time.perf_counter()
        try:
            payload = self._store.read(key, parts)
        except CacheEntryError as exc:
            logger.warning("cache: rejected %s entry: %s; recomputing it", parts.get("kind"), exc)
            payload = None
        if payload is not None:
            self._note(parts, "hit", payload.seconds, time.perf_counter() - started)
            return decode(payload)
        started = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - started
        self._store.write(key, parts, encode(value, seconds))
        self._note(parts, "computed", seconds)
        return value

    def _shared(self, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        import ray

        key, kind = cache_key(parts), str(parts.get("kind"))
        asked = time.monotonic()
        logged = asked
        while True:
            started = time.perf_counter()
            answer = ray.get(self.actor.claim.remote(key, kind, parts, _holder()))
            if answer["state"] == "hit":
                value = decode(ray.get(answer["ref"]))
                served = time.perf_counter() - started
                ray.get(self.actor.served.remote(kind, answer["seconds"], served))
                self._note(parts, "hit", answer["seconds"], served)
                return value
            if answer["state"] == "compute":
                return self._compute_and_publish(key, kind, parts, compute, answer)
            waited = time.monotonic() - asked
            if waited > answer["max_wait_s"]:
                logger.warning("cache: gave up waiting %.0fs for %s (held by pid %s for %.0fs); computing it here",
                               waited, kind, answer["holder"].get("pid"), answer["held_s"])
                return self._computed(parts, compute)
            if time.monotonic() - logged >= WAIT_LOG_S:
                logged = time.monotonic()
                logger.info("cache: waiting %.0fs for %s, computed by pid %s on %s for %.0fs (lease %.0fs)",
                            waited, kind, answer["holder"].get("pid"), answer["holder"].get("host"),
                            answer["held_s"], answer["lease_s"])
            time.sleep(self.poll_s)

    def _compute_and_publish(self, key: str, kind: str, parts: dict[str, Any], compute: Callable[[], T],
                             answer: dict[str, Any]) -> T:
        import ray

        lease = answer["lease"]
        started = time.perf_counter()
        try:
            with _Heartbeat(self.actor, key, lease, answer["heartbeat_s"]):
                value = compute()
                seconds = time.perf_counter() - started
                ray.get(self.actor.publish.remote(key, lease, kind, parts, encode(value, seconds)))
        except BaseException:
            try:
                ray.get(self.actor.release.remote(key, lease), timeout=10)
            except Exception:  # noqa: BLE001 - the lease then expires on its own
                logger.debug("cache: could not release %s", kind, exc_info=True)
            raise
        self._note(parts, "computed", seconds)
        return value

    def _note(self, parts: dict[str, Any], outcome: str, seconds: float, served_s: float | None = None) -> None:
        event = {"kind": parts.get("kind"), "outcome": outcome, "seconds": round(seconds, 3)}
        if served_s is not None:
            event["served_s"] = round(served_s, 3)
        self.events.append(event)
        logger.info("cache %s: %s (%.2fs)", outcome, parts.get("kind"), seconds)

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """This trial's hits, computations and seconds per kind (for its summary.json)."""
        counts: dict[str, KindCounts] = {}
        for event in self.events:
            entry = counts.setdefault(str(event["kind"]), KindCounts())
            if event["outcome"] == "hit":
                entry.hits += 1
                entry.served_s += event.get("served_s", 0.0)
                entry.saved_s += max(0.0, event["seconds"] - event.get("served_s", 0.0))
            else:
                entry.computes += 1
                entry.compute_s += event["seconds"]
        return {kind: {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(c).items()}
                for kind, c in sorted(counts.items())}


def _holder() -> dict[str, Any]:
    """Who asks: the coordinator checks this node's liveness and names it in its logs."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "pid": os.getpid(), "host": socket.gethostname()}
