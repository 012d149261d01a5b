"""The shared statistics cache: one computation per key across concurrent Ray tasks, persisted."""
import time

import pytest
import ray
from conftest import fresh_ray

from raysparse.trial.cache import StatsCache, cache_key, start_coordinator


@pytest.fixture(scope="module")
def local_ray():
    with fresh_ray():
        yield


def test_concurrent_askers_wait_for_one_computation(local_ray, tmp_path):
    directory = tmp_path / "stats"
    coordinator = start_coordinator(directory)
    counter = tmp_path / "computations"

    def ask(delay: float):
        from raysparse.trial.cache import StatsCache

        time.sleep(delay)
        cache = StatsCache(directory, poll_s=0.05)

        def compute():
            with open(counter, "a") as handle:
                handle.write("x")
            time.sleep(1.5)
            return {"ppl": 12.5}

        return cache.get_or_compute({"kind": "dense_ppl", "model": "m"}, compute), cache.events

    task = ray.remote(num_cpus=0.5)(ask)
    results = ray.get([task.remote(0.0), task.remote(0.3), task.remote(0.6)])
    assert [value for value, _ in results] == [{"ppl": 12.5}] * 3
    assert counter.read_text() == "x"  # computed exactly once
    outcomes = sorted(event["outcome"] for _, events in results for event in events)
    assert outcomes == ["computed", "hit", "hit"]
    stats = ray.get(coordinator.get_stats.remote())
    assert stats["misses"] == 1 and stats["hits"] == 2 and stats["saved_s"] > 2.5


def test_values_persist_for_a_later_search_without_the_actor(tmp_path):
    first = StatsCache(tmp_path, use_actor=False)
    assert first.get_or_compute({"kind": "k", "n": 1}, lambda: 3.0) == 3.0
    second = StatsCache(tmp_path, use_actor=False)
    assert second.get_or_compute({"kind": "k", "n": 1}, lambda: pytest.fail("recomputed")) == 3.0
    assert second.get_or_compute({"kind": "k", "n": 2}, lambda: 4.0) == 4.0  # another key
    assert [e["outcome"] for e in second.events] == ["hit", "computed"]
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})


def test_a_failed_computation_lets_the_next_asker_compute(local_ray, tmp_path):
    # Held: a named actor with no handle left is garbage-collected (as the search driver holds it).
    coordinator = start_coordinator(tmp_path / "s")  # noqa: F841
    cache = StatsCache(tmp_path / "s")
    with pytest.raises(RuntimeError):
        cache.get_or_compute({"kind": "boom"}, lambda: (_ for _ in ()).throw(RuntimeError("oom")))
    assert cache.get_or_compute({"kind": "boom"}, lambda: 7) == 7


def test_a_lost_coordinator_leaves_the_trial_on_the_entries_on_storage(local_ray, tmp_path):
    """The coordinator dies under a running trial: this and every later value go to storage."""
    coordinator = start_coordinator(tmp_path / "s")
    cache = StatsCache(tmp_path / "s")
    assert cache.actor is not None
    ray.kill(coordinator)
    assert cache.get_or_compute({"kind": "k"}, lambda: 5) == 5
    assert cache.get_or_compute({"kind": "k"}, lambda: pytest.fail("recomputed")) == 5
    assert [e["outcome"] for e in cache.events] == ["computed", "hit"]


def test_a_killed_computing_trial_is_replaced_and_nobody_hangs(local_ray, tmp_path):
    """The holder of a claim dies mid-computation: its lease lapses, the waiter computes."""
    directory = tmp_path / "stats"
    coordinator = start_coordinator(directory, lease_s=1.5)
    marker = tmp_path / "started"

    class Holder:
        def compute(self):
            from raysparse.trial.cache import StatsCache

            def slow():
                marker.write_text("x")
                time.sleep(600)
                return -1.0

            return StatsCache(directory, poll_s=0.05).get_or_compute({"kind": "slow"}, slow)

    def waiter():
        from raysparse.trial.cache import StatsCache

        cache = StatsCache(directory, poll_s=0.05)
        return cache.get_or_compute({"kind": "slow"}, lambda: 2.0), cache.events

    holder = ray.remote(num_cpus=0.5)(Holder).remote()
    holder.compute.remote()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the holder never started computing"
        time.sleep(0.1)
    waiting = ray.remote(num_cpus=0.5)(waiter).remote()
    ready, _ = ray.wait([waiting], timeout=3.0)  # twice the lease: a live holder's heartbeats keep it
    assert not ready
    killed = time.monotonic()
    ray.kill(holder)
    value, events = ray.get(waiting, timeout=60)
    assert value == 2.0 and [e["outcome"] for e in events] == ["computed"]
    assert time.monotonic() - killed < 20
    stats = ray.get(coordinator.get_stats.remote())
    assert stats["leases_expired"] == 1 and stats["by_kind"]["slow"]["computed"] == 1


def test_served_values_are_zero_copy_and_persisted_in_safe_formats(local_ray, tmp_path):
    """The coordinator owns the value (a trial that published it may be gone); storage holds
    JSON + safetensors only, which launch/prune.py (no Ray) reads back."""
    import torch

    directory = tmp_path / "stats"
    coordinator = start_coordinator(directory)
    value = {"masks": {"w": torch.rand(64, 64) > 0.5}, "weights": {"w": torch.randn(64, 64).to(torch.bfloat16)},
             "ratios": [0.25, 0.75]}
    parts = {"kind": "prune_masks", "n": 1}

    def publish():
        from raysparse.trial.cache import StatsCache

        StatsCache(directory).get_or_compute(parts, lambda: value)

    ray.get(ray.remote(num_cpus=0.5)(publish).remote())  # its worker may exit: the coordinator owns the value
    answer = ray.get(coordinator.claim.remote(cache_key(parts), "prune_masks", parts, {"pid": 0}))
    payload = ray.get(answer["ref"])
    assert answer["state"] == "hit" and not payload.arrays["t0"].flags.writeable  # shared memory, not a copy
    served = StatsCache(directory).get_or_compute(parts, lambda: pytest.fail("recomputed"))
    assert torch.equal(served["masks"]["w"], value["masks"]["w"]) and served["ratios"] == [0.25, 0.75]
    assert torch.equal(served["weights"]["w"], value["weights"]["w"]) and served["weights"]["w"].dtype == torch.bfloat16
    key = cache_key(parts)
    assert sorted(p.name for p in directory.iterdir()) == [f"{key}.json", f"{key}.safetensors"]
    offline = StatsCache(directory, use_actor=False)
    assert torch.equal(offline.get_or_compute(parts, lambda: pytest.fail("recomputed"))["masks"]["w"],
                       value["masks"]["w"])


def test_the_memory_cap_evicts_least_recently_used_to_storage(local_ray, tmp_path):
    import torch

    directory = tmp_path / "stats"
    coordinator = start_coordinator(directory, memory_bytes=2500)
    cache = StatsCache(directory)
    for n in range(3):
        cache.get_or_compute({"kind": "big", "n": n}, lambda: torch.zeros(1000, dtype=torch.uint8))
    memory = ray.get(coordinator.get_stats.remote())["memory"]
    assert memory["evicted"] == 1 and memory["entries"] == 2 and memory["held_bytes"] <= 2500
    assert cache.get_or_compute({"kind": "big", "n": 0}, lambda: pytest.fail("recomputed")).numel() == 1000
    stats = ray.get(coordinator.get_stats.remote())
    assert stats["by_kind"]["big"]["read_from_storage"] == 1 and stats["by_kind"]["big"]["computed"] == 3


class _RunsCode:
    """Unpickling this runs a shell command: what a writer of a shared bucket could plant."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_tampered_entry_is_rejected_and_never_executed(tmp_path):
    import hashlib
    import json
    import pickle

    import torch

    from raysparse.trial.cache_store import CacheEntryError, EntryStore

    parts = {"kind": "prune_masks", "n": 1}
    key = cache_key(parts)
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(_RunsCode(marker))

    def fresh():
        return {"masks": {"w": torch.ones(4, dtype=torch.bool)}}

    def entry_after(tamper) -> list[str]:
        cache = StatsCache(tmp_path, use_actor=False)
        cache.get_or_compute(parts, fresh)
        tamper()
        again = StatsCache(tmp_path, use_actor=False)
        assert torch.equal(again.get_or_compute(parts, fresh)["masks"]["w"], torch.ones(4, dtype=torch.bool))
        return [e["outcome"] for e in again.events]

    tensor_file, json_file = tmp_path / f"{key}.safetensors", tmp_path / f"{key}.json"
    assert entry_after(lambda: None) == ["hit"]
    assert entry_after(lambda: tensor_file.write_bytes(evil)) == ["computed"]  # digest mismatch
    assert entry_after(lambda: json_file.write_bytes(evil)) == ["computed"]  # not JSON

    def pickle_with_matching_digest():  # a writer who can rewrite both files
        tensor_file.write_bytes(evil)
        entry = json.loads(json_file.read_text())
        entry["tensors"]["sha256"] = hashlib.sha256(evil).hexdigest()
        json_file.write_text(json.dumps(entry))

    assert entry_after(pickle_with_matching_digest) == ["computed"]  # not safetensors

    def other_key():
        entry = json.loads(json_file.read_text())
        entry["parts"]["n"] = 2
        json_file.write_text(json.dumps(entry))

    assert entry_after(other_key) == ["computed"]
    pickle_with_matching_digest()
    with pytest.raises(CacheEntryError, match="not a safetensors file"):
        EntryStore(str(tmp_path)).read(key, parts)
    (tmp_path / f"{key}.pt").write_bytes(evil)  # the old pickle format is never opened
    assert entry_after(lambda: None) == ["hit"]
    assert not marker.exists()


def test_a_claim_held_on_a_dead_node_is_released_at_once(tmp_path):
    """Ray reports the holder's node dead: no need to wait for its lease to lapse."""
    from raysparse.trial.cache_coordinator import CacheCoordinator

    coordinator = CacheCoordinator(str(tmp_path), memory_bytes=1 << 20, lease_s=3600)
    first = coordinator.claim("k", "kind", {"kind": "kind"}, {"node_id": "lost", "pid": 1})
    assert first["state"] == "compute"
    assert coordinator.claim("k", "kind", {"kind": "kind"}, {"node_id": "alive", "pid": 2})["state"] == "wait"
    coordinator.state.dead_nodes, coordinator.state.nodes_checked = {"lost"}, time.time() + 3600
    assert coordinator.claim("k", "kind", {"kind": "kind"}, {"node_id": "alive", "pid": 2})["state"] == "compute"
    assert coordinator.get_stats()["leases_expired"] == 1
