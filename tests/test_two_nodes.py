"""A head and a worker node started with `ray start` on loopback; a search uses both."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_node_cluster(tiny_preset):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    if not Path(ray_cli).exists():
        ray_cli = shutil.which("ray")
    # Ray 2.60 clusters use token auth once a token exists: make one and use it everywhere.
    env = dict(os.environ, RAY_AUTH_MODE="token")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_search_with_address_schedules_trials_on_both_nodes(two_node_cluster, tmp_path):
    import pyarrow.csv as pacsv

    address, env = two_node_cluster
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "search.py"), "--space", str(space),
                           "--address", address, "--num-samples", "4", "--max-concurrent", "2",
                           "--storage", str(tmp_path / "runs"), "--name", "two", "--no-early-stopping"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pacsv.read_csv(tmp_path / "runs" / "two" / "results.csv").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert len({r["node_id"] for r in rows}) == 2  # trial placement is recorded and spans both nodes

