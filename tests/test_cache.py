"""The shared statistics cache: one computation per key across concurrent Ray tasks, persisted."""
import time

import pytest
import ray

from raysparse.trial.cache import StatsCache, cache_key, start_coordinator


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    start_coordinator(tmp_path / "s")
    cache = StatsCache(tmp_path / "s")
    with pytest.raises(RuntimeError):
        cache.get_or_compute({"kind": "boom"}, lambda: (_ for _ in ()).throw(RuntimeError("oom")))
    assert cache.get_or_compute({"kind": "boom"}, lambda: 7) == 7
