"""Train-in-Tune end to end: a search trial whose recovery runs on Ray Train FSDP workers, with
its trial and its workers visible through the Ray dashboard's own HTTP API."""
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

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


def dashboard_poll(base: str, path: str, done, within_s: float = 180.0):
    """Ask the dashboard until `done(answer)` or `within_s` passed; the last answer. A loaded
    machine makes the dashboard slow to answer and slow to list what just happened."""
    deadline = time.monotonic() + within_s
    answer = None
    while True:
        try:
            answer = dashboard_get(base, path)
        except OSError:  # timed out or refused for a moment: ask again
            pass
        if (answer is not None and done(answer)) or time.monotonic() > deadline:
            return answer
        time.sleep(2.0)


def actor_classes(actors) -> dict[str, str]:
    """actor id -> class name, from the dashboard's actor table."""
    return {a.get("actor_id", ""): a.get("class_name", "") for a in actors["data"]["result"]["result"]}


def is_trial_actor(class_name: str) -> bool:
    return "ImplicitFunc" in class_name or "search_trainable" in class_name


def test_a_trial_with_train_workers_completes_and_shows_in_the_dashboard(tiny_preset, tmp_path, monkeypatch):
    # Not set by the user: raysparse turns Train state tracking on where it builds the trainer.
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)
    # 3 logical CPUs on the 2-core machine: 0.5 for the trial (the Train driver) + 2 x 1 for workers.
    # address="local": always a fresh instance, even when a `ray start` cluster runs on the machine.
    # A "driver" resource as cluster.yaml gives the head: the trial must hold one unit of it.
    context = ray.init(address="local", num_cpus=3, resources={"driver": 1}, include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=False)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    settings = SearchSettings(space=str(space), num_samples=1, max_concurrent=1, cpus_per_trial=0.5,
                              storage=str(tmp_path / "runs"), name="t", searcher="random", early_stopping=False,
                              max_failures=0, driver_resource="driver",
                              final_eval=False)  # the dashboard view of the search itself
    # Watch the dashboard while the search runs, as a user does: a finished actor may leave the
    # dashboard's table before the search returns on a loaded machine, so collect every actor seen.
    seen: dict[str, str] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                seen.update(actor_classes(dashboard_get(context.dashboard_url, "/api/v0/actors?limit=1000&detail=1")))
            except OSError:  # the dashboard may be slow to answer on a loaded machine; ask again
                pass
            stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = run_search(settings)  # in the main thread: Tune installs its signal handlers there
        stop.set()
        watcher.join(timeout=60)
        actors = dashboard_poll(context.dashboard_url, "/api/v0/actors?limit=1000&detail=1", lambda answer: True)
        seen.update(actor_classes(actors) if actors is not None else {})
        runs = dashboard_poll(context.dashboard_url, "/api/train/v2/runs/v1",  # Train V2 runs
                              lambda answer: "recovery-iter001" in json.dumps(answer))
    finally:
        stop.set()
        ray.shutdown()
    rows = report["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "completed", rows
    summary_files = list((tmp_path / "runs" / "t").glob("*/checkpoint_*/summary.json"))
    assert len(summary_files) == 1
    summary = json.loads(summary_files[0].read_text())
    record = summary["history"][0]
    assert record["workers"] == 2 and record["steps"] == 2
    # Train's epoch checkpoints went to the trial's folder on the search's storage, removed once finished.
    trial = summary_files[0].parent.parent
    assert summary["config"]["ray_train_storage"].endswith(f"{trial.name}/ray_train")
    assert summary["config"]["ray_train_storage"].startswith("/")
    assert not (trial / "ray_train").exists()

    classes = list(seen.values())
    assert sum("RayTrainWorker" in c for c in classes) >= 2, ", ".join(sorted(set(classes)))
    assert any(is_trial_actor(c) for c in classes), ", ".join(sorted(set(classes)))
    names = json.dumps(runs)
    assert "recovery-iter001" in names, names[:500]
