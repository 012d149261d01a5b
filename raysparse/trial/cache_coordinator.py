"""The cache's coordinator: an actor that owns every cached value and leases each missing key.

Created by the search driver on its own node (an actor created inside a trial dies with
the trial, and a value a trial `ray.put`s dies with it too), so it lives as long as the
search. For each key it answers a trial's `claim` with one of:

- hit: an ObjectRef of the value, which the coordinator `ray.put` itself (owner: the
  coordinator, not the trial that computed it), read zero-copy by trials on its node and
  moved by Ray to others; a key not in memory is read through from storage first;
- compute: a lease, renewed by the computing trial's heartbeats. A lease whose holder went
  silent for `lease_s` (trial killed, worker or node lost) or whose node Ray reports dead is
  released, and the next asker computes the key: no waiter polls forever;
- wait: someone holds a live lease; the answer says who and for how long, and how long the
  asker may wait at most before computing the value itself.

What trials publish is written through to storage (safe formats, see cache_store) before it
is served, so a resumed or later search and `launch/prune.py` reuse it. The values held in
the object store are capped at `memory_bytes`: least recently used entries are dropped
from memory (they stay on storage and are read back on the next claim).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from raysparse.trial.cache_store import CacheEntryError, EntryStore, Payload

logger = logging.getLogger(__name__)

LEASE_S = 30.0  # a computing trial silent this long has lost its claim

MAX_WAIT_S = 2 * 3600.0  # a waiter computes the value itself after this long

NODE_CHECK_S = 2.0  # how often the liveness of lease holders' nodes is asked of Ray at most

COORDINATOR = "coordinator"  # the holder of a key the coordinator itself is reading from storage


@dataclass
class Lease:
    """Who computes a key, since when, and when they were last heard of."""

    lease_id: str
    holder: dict[str, Any]
    kind: str
    granted: float
    beat: float


@dataclass
class Held:
    """A value in the object store: the coordinator's ObjectRef and what it costs to keep."""

    ref: Any
    nbytes: int
    kind: str
    seconds: float


@dataclass
class KindStats:
    """Per kind of value: how often computed and served, and the seconds that cost or saved."""

    computed: int = 0
    served: int = 0
    read_from_storage: int = 0
    rejected: int = 0  # persisted entries that failed their checks (recomputed)
    compute_s: float = 0.0
    saved_s: float = 0.0  # computation time of every serve, less what serving it took
    serve_s: float = 0.0


@dataclass
class MemoryStats:
    limit_bytes: int
    held_bytes: int = 0
    peak_bytes: int = 0
    entries: int = 0
    evicted: int = 0
    not_held: int = 0  # values larger than the limit: served from storage each time


@dataclass
class CoordinatorState:
    leases: dict[str, Lease] = field(default_factory=dict)
    held: OrderedDict[str, Held] = field(default_factory=OrderedDict)
    kinds: dict[str, KindStats] = field(default_factory=dict)
    leases_expired: int = 0
    dead_nodes: set[str] = field(default_factory=set)
    nodes_checked: float = 0.0


class CacheCoordinator:
    """Actor body (run it threaded: a claim never waits behind another trial's storage read)."""

    def __init__(self, location: str, memory_bytes: int, lease_s: float = LEASE_S, max_wait_s: float = MAX_WAIT_S):
        self.store = EntryStore(location)
        self.lease_s = float(lease_s)
        self.max_wait_s = float(max_wait_s)
        self.memory = MemoryStats(limit_bytes=int(memory_bytes))
        self.state = CoordinatorState()
        self.lock = threading.Lock()

    def _kind(self, kind: str) -> KindStats:
        return self.state.kinds.setdefault(kind, KindStats())

    def claim(self, key: str, kind: str, parts: dict[str, Any], holder: dict[str, Any]) -> dict[str, Any]:
        """hit (with the value's ObjectRef), compute (with a lease), or wait."""
        with self.lock:
            answer = self._claim_locked(key, kind, holder)
            if answer is not None:
                return answer
            # Not in memory and nobody computes it: look on storage, holding the key meanwhile.
            self.state.leases[key] = Lease(uuid.uuid4().hex, {COORDINATOR: True}, kind, time.time(), time.time())
        payload = self._read_through(key, kind, parts)
        with self.lock:
            self.state.leases.pop(key, None)
            if payload is not None:
                self._kind(kind).read_from_storage += 1
                return self._hit(key, kind, payload)
            return self._grant(key, kind, holder)

    def _claim_locked(self, key: str, kind: str, holder: dict[str, Any]) -> dict[str, Any] | None:
        held = self.state.held.get(key)
        if held is not None:
            self.state.held.move_to_end(key)
            return {"state": "hit", "ref": held.ref, "seconds": held.seconds}
        lease = self.state.leases.get(key)
        if lease is None:
            return None
        silent = time.time() - lease.beat
        if lease.holder.get(COORDINATOR) or (silent <= self.lease_s and not self._node_dead(lease.holder)):
            return {"state": "wait", "holder": lease.holder, "held_s": round(time.time() - lease.granted, 1),
                    "max_wait_s": self.max_wait_s, "lease_s": self.lease_s}
        logger.warning("cache: releasing the lease on %s %s held by %s (silent %.0fs%s); %s computes it",
                       lease.kind, key[:12], _who(lease.holder), silent,
                       ", its node is dead" if self._node_dead(lease.holder) else "", _who(holder))
        self.state.leases_expired += 1
        del self.state.leases[key]
        return self._grant(key, kind, holder)

    def _grant(self, key: str, kind: str, holder: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        lease = Lease(uuid.uuid4().hex, holder, kind, now, now)
        self.state.leases[key] = lease
        return {"state": "compute", "lease": lease.lease_id, "heartbeat_s": self.lease_s / 5}

    def _node_dead(self, holder: dict[str, Any]) -> bool:
        """Whether Ray reports the holder's node dead (asked at most every NODE_CHECK_S)."""
        node = holder.get("node_id")
        if not node:
            return False
        if time.time() - self.state.nodes_checked > NODE_CHECK_S:
            import ray

            try:
                self.state.dead_nodes = {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}
            except Exception:  # noqa: BLE001 - liveness is a shortcut; heartbeats still expire
                logger.debug("cache: cannot list Ray nodes", exc_info=True)
            self.state.nodes_checked = time.time()
        return node in self.state.dead_nodes

    def _read_through(self, key: str, kind: str, parts: dict[str, Any]) -> Payload | None:
        try:
            return self.store.read(key, parts)
        except CacheEntryError as exc:
            logger.warning("cache: rejected %s entry: %s; it is recomputed", kind, exc)
            with self.lock:
                self._kind(kind).rejected += 1
        except OSError as exc:
            logger.warning("cache: cannot read %s entry %s from %s (%s); it is recomputed",
                           kind, key[:12], self.store.location, exc)
        return None

    def _hit(self, key: str, kind: str, payload: Payload) -> dict[str, Any]:
        return {"state": "hit", "ref": self._hold(key, kind, payload), "seconds": payload.seconds}

    def _hold(self, key: str, kind: str, payload: Payload) -> Any:
        """`ray.put` the value (the coordinator owns it) and keep it, least recently used out first."""
        import ray

        ref = ray.put(payload)
        size = payload.nbytes
        if size > self.memory.limit_bytes:  # served this once; read from storage again next time
            self.memory.not_held += 1
            return ref
        self.state.held[key] = Held(ref, size, kind, payload.seconds)
        self.memory.held_bytes += size
        while self.memory.held_bytes > self.memory.limit_bytes:
            _, old = self.state.held.popitem(last=False)
            self.memory.held_bytes -= old.nbytes
            self.memory.evicted += 1
        self.memory.entries = len(self.state.held)
        self.memory.peak_bytes = max(self.memory.peak_bytes, self.memory.held_bytes)
        return ref

    def heartbeat(self, key: str, lease_id: str) -> bool:
        """Renew a lease; False when it was released (the holder was silent too long)."""
        with self.lock:
            lease = self.state.leases.get(key)
            if lease is None or lease.lease_id != lease_id:
                return False
            lease.beat = time.time()
            return True

    def publish(self, key: str, lease_id: str, kind: str, parts: dict[str, Any], payload: Payload) -> bool:
        """Store a computed value (storage first, then the object store); end its lease.

        Returns whether it reached storage. A value published twice (a waiter that gave up
        and computed it too) keeps the first copy.
        """
        persisted = True
        try:
            self.store.write(key, parts, payload)
        except Exception as exc:  # noqa: BLE001 - the value is still served from memory
            persisted = False
            logger.error("cache: cannot write %s entry %s to %s: %s", kind, key[:12], self.store.location, exc)
        with self.lock:
            stats = self._kind(kind)
            stats.computed += 1
            stats.compute_s += payload.seconds
            if key not in self.state.held:
                self._hold(key, kind, payload)
            lease = self.state.leases.get(key)
            if lease is not None and lease.lease_id == lease_id:
                del self.state.leases[key]
        return persisted

    def release(self, key: str, lease_id: str) -> None:
        """The computing trial failed: the next asker computes the key."""
        with self.lock:
            lease = self.state.leases.get(key)
            if lease is not None and lease.lease_id == lease_id:
                del self.state.leases[key]

    def served(self, kind: str, seconds: float, serve_s: float) -> None:
        """A trial read a value instead of computing it (`seconds`: what computing it cost)."""
        with self.lock:
            stats = self._kind(kind)
            stats.served += 1
            stats.saved_s += max(0.0, seconds - serve_s)
            stats.serve_s += serve_s

    def get_stats(self) -> dict[str, Any]:
        """Totals (hits, misses, seconds), per kind, the object-store memory, released leases."""
        with self.lock:
            kinds = {kind: {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(s).items()}
                     for kind, s in sorted(self.state.kinds.items())}
            return {"hits": sum(s.served for s in self.state.kinds.values()),
                    "misses": sum(s.computed for s in self.state.kinds.values()),
                    "computed_s": round(sum(s.compute_s for s in self.state.kinds.values()), 3),
                    "saved_s": round(sum(s.saved_s for s in self.state.kinds.values()), 3),
                    "by_kind": kinds, "memory": asdict(self.memory), "leases_expired": self.state.leases_expired,
                    "storage": self.store.location}


def _who(holder: dict[str, Any]) -> str:
    if holder.get(COORDINATOR):
        return "the coordinator"
    return f"pid {holder.get('pid')} on {holder.get('host')} (node {str(holder.get('node_id'))[:8]})"
