"""A head and a worker node started with `ray start` on loopback; a search uses both."""
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
fixed:
  model: tiny
  method: magnitude
  sparsity: 0.5
  recovery: masked
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 4
params:
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


@pytest.fixture(scope="module")
def two_node_cluster(tiny_preset):
    cluster = start_cluster(head_cpus=1, worker_cpus=[1])
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_search_with_address_schedules_trials_on_both_nodes(two_node_cluster, tmp_path):
    import pyarrow.csv as pacsv

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "search.py"), "--space", str(space),
                           "--address", two_node_cluster.address, "--num-samples", "4", "--max-concurrent", "2",
                           "--storage", str(tmp_path / "runs"), "--name", "two", "--no-early-stopping"],
                          env=two_node_cluster.env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pacsv.read_csv(tmp_path / "runs" / "two" / "results.csv").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert len({r["node_id"] for r in rows}) == 2  # trial placement is recorded and spans both nodes
    # Each finished trial reached the storage path as its final Tune checkpoint, whichever node ran it.
    assert len(list((tmp_path / "runs" / "two").glob("*/checkpoint_*/summary.json"))) == 4


PROBE = """
import sys, ray
from raysparse.errors import ConfigError
from raysparse.cluster.preflight import check_shared_storage, unshared_nodes
ray.init(address=sys.argv[1], log_to_driver=False)
print("absolute", unshared_nodes(sys.argv[2]))
try:
    check_shared_storage(".")
except ConfigError as exc:
    print("relative", exc)
"""


def test_storage_that_differs_between_nodes_is_detected(two_node_cluster, tmp_path):
    """A relative path names a different folder for the driver and for each node's workers
    (their working directories differ): the same situation as a node-local disk. Run in a
    child process: token auth is read once per process, at Ray's import."""
    proc = subprocess.run([sys.executable, "-c", PROBE, two_node_cluster.address, str(tmp_path)], cwd=tmp_path,
                          env={**two_node_cluster.env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "absolute []" in lines  # one filesystem: shared
    relative = [line for line in lines if line.startswith("relative ")]
    assert relative and "not shared across the cluster's nodes" in relative[0], proc.stdout
    assert relative[0].count("node ") == 2  # both nodes named
    assert not list(tmp_path.glob(".raysparse-shared-*"))  # the probe file is cleaned up


JOIN = """
import os, ray
os.environ.pop("RAY_ADDRESS", None)
from raysparse.recover.distributed.driver import _ensure_ray
started = _ensure_ray(1, 1.0, False)
print("joined", started, ray.cluster_resources().get("CPU"), ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_distributed_recovery_joins_a_ray_start_cluster_without_sizing_it():
    """A `ray start` head recorded on this machine is joined (ray.init refuses num_cpus there)."""
    cluster = start_cluster(head_cpus=1, worker_cpus=[])
    try:
        env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=180)
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "joined True 1.0 " in proc.stdout  # the cluster's one CPU, not this machine's count
    assert proc.stdout.strip().endswith(f":{cluster.port}")  # that cluster, not a local instance
