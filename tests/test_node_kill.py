"""Fault tolerance under node loss: kill a worker node while a trial runs on it.

Two `ray start` nodes on loopback; the search's trials are iterative (a checkpoint after
every finished iteration, in the trial's folder on the storage path). The worker node's
raylet and everything it started are SIGKILLed once a trial placed there has checkpointed
at least one iteration; Tune (max_failures) retries that trial on the surviving head, and
the retry must continue from the checkpoint, not start over.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import read_json, start_cluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
fixed:
  model: tiny
  method: magnitude
  schedule: iterative
  sparsity: 0.6
  recovery: masked
  train_samples: 16
  max_steps: 4
  batch_size: 8
  eval_max_windows: 4
params:
  prune_percentage: {uniform: [0.14, 0.16]}   # 6 iterations: time to kill mid-trial
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""
# A killed node is declared dead after period x threshold (default 3 s x 5 plus slack).
FAST_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def trial_on_node_with_checkpoint(experiment: Path, node_id: str) -> Path | None:
    """A trial folder whose current attempt runs on `node_id` and has checkpointed an iteration."""
    for attempts in experiment.glob("*/trial/attempts.json"):
        history = read_json(attempts).get("history") or [{}]
        if history[-1].get("node_id") == node_id and (attempts.parent / "checkpoint" / "state.json").is_file():
            return attempts.parent
    return None


@pytest.mark.parametrize("storage_kind", ["shared folder", "object storage"])
def test_killing_a_worker_node_mid_trial_retries_it_from_its_checkpoint(tiny_preset, tmp_path, storage_kind):
    """Shared folder: trials write to storage directly. Object storage (a file:// URI, the same
    pyarrow/Tune path as s3://): trials work locally and Tune uploads their folders on report."""
    import pyarrow.csv as pacsv

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    experiment = tmp_path / "runs" / "nodekill"
    storage = str(tmp_path / "runs") if storage_kind == "shared folder" else (tmp_path / "runs").as_uri()
    cluster = start_cluster(head_cpus=1, worker_cpus=[1], system_config=FAST_DEATH)
    try:
        (victim,) = cluster.worker_node_ids
        search = subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "search.py"), "--space", str(space), "--address", cluster.address,
             "--num-samples", "3", "--max-concurrent", "2", "--max-failures", "2", "--storage", storage,
             "--name", "nodekill", "--no-early-stopping"],
            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        killed = None
        while time.time() < deadline and search.poll() is None and killed is None:
            killed = trial_on_node_with_checkpoint(experiment, victim)
            if killed is None:
                time.sleep(0.2)
        assert killed is not None, f"no trial checkpointed on the worker node (search exit {search.poll()})"
        done_before = read_json(killed / "checkpoint" / "state.json").get("completed")
        cluster.kill_node(victim)
        output, _ = search.communicate(timeout=300)
    finally:
        cluster.stop()
    assert search.returncode == 0, output[-3000:]

    rows = pacsv.read_csv(experiment / "results.csv").to_pylist()
    assert len(rows) == 3, rows  # no trial lost
    assert all(r["status"] == "completed" or (r["status"] == "error" and r["error"]) for r in rows), rows
    retried = [r for r in rows if r["attempt"] > 1]
    assert retried, rows
    assert {Path(r["path"]).name for r in retried} == {killed.parent.name}
    (row,) = retried
    assert row["status"] == "completed" and row["node_id"] != victim  # finished on the surviving node
    # It continued from the checkpoint the killed attempt left, not from the dense model.
    assert row["resumed_after"] >= done_before >= 1
    attempts = read_json(killed / "attempts.json")["history"]
    assert [a["node_id"] == victim for a in attempts][:1] == [True] and len(attempts) >= 2
    assert read_json(killed / "summary.json")["iterations"] == 6
