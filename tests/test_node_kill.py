"""Fault tolerance under node loss: kill a worker node while a trial runs on it.

Two `ray start` nodes on loopback; the search's trials are iterative (after every finished
iteration a checkpoint reported to Tune, which copies it to the trial's folder on the
storage path). The worker node's raylet and everything it started are SIGKILLed once a
trial placed there has checkpointed at least one iteration; Tune (max_failures) retries
that trial on the surviving head from `tune.get_checkpoint()`, and the retry must
continue from that checkpoint, not start over.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import read_json, start_cluster, trial_checkpointed_on

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

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


@pytest.mark.parametrize("storage_kind", ["shared folder", "object storage"])
def test_killing_a_worker_node_mid_trial_retries_it_from_its_checkpoint(tiny_preset, tmp_path, storage_kind):
    """Shared folder or object storage (a file:// URI, the same pyarrow/Tune path as s3://):
    either way trials work locally and Tune persists each reported checkpoint to storage."""
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
        found = None
        while time.time() < deadline and search.poll() is None and found is None:
            found = trial_checkpointed_on(experiment, victim)
            if found is None:
                time.sleep(0.2)
        assert found is not None, f"no trial checkpointed on the worker node (search exit {search.poll()})"
        killed, done_before = found
        # The checkpoint is on storage before its report reaches the driver: give Tune a moment
        # to register it (an iteration takes longer), so the retry is handed this one or a later one.
        time.sleep(1.0)
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
    assert {Path(r["path"]).name for r in retried} == {killed.name}
    (row,) = retried
    assert row["status"] == "completed" and row["node_id"] != victim  # finished on the surviving node
    # It continued from the checkpoint the killed attempt left, not from the dense model.
    assert row["resumed_after"] >= done_before >= 1
    (summary_file,) = killed.glob("checkpoint_*/summary.json")  # the final report's checkpoint
    summary = read_json(summary_file)
    attempts = summary["attempts"]  # the log the checkpoints carried from start to start
    assert [a["node_id"] == victim for a in attempts][:1] == [True] and len(attempts) >= 2
    assert attempts[-1]["resumed_after"] == row["resumed_after"] and attempts[-1]["node_id"] == row["node_id"]
    assert summary["iterations"] == 6
    # Steps add up over both attempts: every iteration's steps are counted once.
    assert row["train_steps_total"] == summary["train_steps_total"] == sum(h["steps"] for h in summary["history"])
    assert not (killed / "ray_train").exists()
