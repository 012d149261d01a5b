"""Train-in-Tune end to end: a search trial whose recovery runs on Ray Train FSDP workers, with
its trial and its workers visible through the Ray dashboard's own HTTP API."""
import json
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings

pytestmark = pytest.mark.slow

SPACE = """
description: one-shot magnitude 50% + masked recovery on 2 Ray Train workers
fixed:
  model: tiny
  method: magnitude
  sparsity: 0.5
  recovery: masked
  workers: 2
  train_samples: 16
  max_steps: 2
  batch_size: 4
  eval_max_windows: 4
params:
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


def dashboard_get(base: str, path: str):
    request = urllib.request.Request(f"http://{base}{path}")
    token_file = Path.home() / ".ray" / "auth_token"
    if token_file.is_file():  # Ray 2.60 may turn on token auth for local clusters
        request.add_header("Authorization", f"Bearer {token_file.read_text().strip()}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def actor_classes(actors) -> list[str]:
    return [a.get("class_name", "") for a in actors["data"]["result"]["result"]]


def is_trial_actor(class_name: str) -> bool:
    return class_name.startswith("ImplicitFunc") or "search_trainable" in class_name


def dashboard_views(base: str, deadline_s: float = 30.0):
    """The actor table and the Train runs, polled until the trial actor shows: the dashboard reads
    the GCS tables asynchronously, and on a loaded machine a finished actor can appear late."""
    start = time.monotonic()
    while True:
        actors = dashboard_get(base, "/api/v0/actors?limit=1000&detail=1")
        runs = dashboard_get(base, "/api/train/v2/runs/v1")  # Train V2 runs
        seen = any(is_trial_actor(c) for c in actor_classes(actors)) and "recovery-iter001" in json.dumps(runs)
        if seen or time.monotonic() - start > deadline_s:
            return actors, runs
        time.sleep(1.0)


def test_a_trial_with_train_workers_completes_and_shows_in_the_dashboard(tiny_preset, tmp_path, monkeypatch):
    # Not set by the user: raysparse turns Train state tracking on where it builds the trainer.
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)
    # 3 logical CPUs on the 2-core machine: 0.5 for the trial (the Train driver) + 2 x 1 for workers.
    # address="local": always a fresh instance, even when a `ray start` cluster runs on the machine.
    # A "driver" resource as cluster.yaml gives the head: the trial must hold one unit of it.
    context = ray.init(address="local", num_cpus=3, resources={"driver": 1}, include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        space = tmp_path / "space.yaml"
        space.write_text(SPACE)
        report = run_search(SearchSettings(space=str(space), num_samples=1, max_concurrent=1, cpus_per_trial=0.5,
                                           storage=str(tmp_path / "runs"), name="t", searcher="random",
                                           early_stopping=False, max_failures=0, driver_resource="driver",
                                           final_eval=False))  # the dashboard view of the search itself
        actors, runs = dashboard_views(context.dashboard_url)
    finally:
        ray.shutdown()
    rows = report["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "completed", rows
    summary_files = list((tmp_path / "runs" / "t").glob("*/checkpoint_*/summary.json"))
    assert len(summary_files) == 1
    record = json.loads(summary_files[0].read_text())["history"][0]
    assert record["workers"] == 2 and record["steps"] == 2

    classes = actor_classes(actors)
    assert sum("RayTrainWorker" in c for c in classes) >= 2, classes
    assert any(is_trial_actor(c) for c in classes), sorted(set(classes))
    names = json.dumps(runs)
    assert "recovery-iter001" in names, names[:500]
