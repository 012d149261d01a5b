"""A Ray cluster of separate `ray start` nodes on loopback, for multi-node tests and benchmarks.

Each node is its own raylet process with its own resources, exactly as on real machines;
only the network (and the filesystem, which is therefore "shared") is the same. Cleanup
kills only this cluster's processes (found by its session folder and port), not every Ray
process of the user the way `ray stop --force` would: other Ray instances on the machine
(another test run, a developer's search) survive.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli() -> str:
    cli = Path(sys.executable).with_name("ray")
    return str(cli) if cli.exists() else (shutil.which("ray") or "ray")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, full command line) of every process."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            table[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) == 3 else "")
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


@dataclass
class LoopbackCluster:
    """A head plus worker nodes; `address` and `env` (token auth) are what clients need."""

    port: int
    env: dict[str, str]
    session: str = ""
    worker_node_ids: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def raylets(self) -> dict[str, int]:
        """node id -> raylet pid, for this cluster's nodes."""
        found = {}
        for pid, (_, args) in processes().items():
            if "/raylet " in args and "--node_id=" in args and self.session in args:
                node_id = args.split("--node_id=", 1)[1].split()[0]
                found[node_id] = pid
        return found

    def kill_node(self, node_id: str) -> None:
        """SIGKILL a node's raylet and everything it started (its trial workers): a lost machine."""
        table = processes()
        raylet = self.raylets()[node_id]
        for pid in sorted(descendants({raylet}, table), reverse=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        table = processes()
        roots = {pid for pid, (_, args) in table.items()
                 if (self.session and self.session in args) or f":{self.port} " in f"{args} "
                 or f"--gcs-address=127.0.0.1:{self.port}" in args}
        roots.discard(os.getpid())
        for pid in sorted(descendants(roots, table) - {os.getpid()}, reverse=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        forget_address(self.port)


def forget_address(port: int) -> None:
    """Remove `ray start`'s record of this cluster (as `ray stop` does) if it still names it.

    A plain `ray.init()` connects to the recorded cluster: left behind, the record makes
    later local `ray.init(num_cpus=...)` calls fail ("When connecting to an existing
    cluster, num_cpus ... must not be provided") or wait on a dead address.
    """
    from ray._private.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    try:
        if record.read_text().strip().endswith(f":{port}"):
            record.unlink()
    except OSError:
        pass


def start_cluster(head_cpus: float = 1, worker_cpus: list[float] | None = None,
                  system_config: dict[str, str] | None = None, timeout_s: float = 120) -> LoopbackCluster:
    """Start a head and one worker node per `worker_cpus` entry; the caller must `stop()` it.

    `system_config` sets Ray system settings through `RAY_<name>` environment variables on
    every node (e.g. a shorter health-check period so a killed node is declared dead fast).
    """
    cli = ray_cli()
    # Ray 2.60 clusters use token auth once a token exists: make one and use it everywhere.
    env = dict(os.environ, RAY_AUTH_MODE="token", **{f"RAY_{k}": str(v) for k, v in (system_config or {}).items()})
    subprocess.run([cli, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    cluster = LoopbackCluster(port=free_port(), env=env)
    common = ["--disable-usage-stats"]
    try:
        subprocess.run([cli, "start", "--head", f"--port={cluster.port}", f"--num-cpus={head_cpus:g}",
                        "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, timeout=timeout_s)
        head_session = _session_of_port(cluster.port)
        cluster.session = head_session
        before = set(cluster.raylets())
        for cpus in worker_cpus if worker_cpus is not None else [1]:
            subprocess.run([cli, "start", f"--address={cluster.address}", f"--num-cpus={cpus:g}", *common],
                           env=env, check=True, capture_output=True, timeout=timeout_s)
        cluster.worker_node_ids = sorted(set(cluster.raylets()) - before)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _session_of_port(port: int) -> str:
    """The session folder name of the head listening on `port` (from its GCS command line)."""
    for _ in range(50):
        for _, args in processes().values():
            if "gcs_server" in args and f"--gcs_server_port={port}" in args and "session_" in args:
                return "session_" + args.split("session_", 1)[1].split("/", 1)[0]
        time.sleep(0.2)
    raise RuntimeError(f"no GCS server found for port {port}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def trial_checkpointed_on(experiment: Path, node_id: str) -> tuple[Path, int] | None:
    """(trial folder, iterations) of a Tune checkpoint on storage that an attempt on `node_id`
    reported with at least one finished iteration (the attempt log travels in its state)."""
    for state_file in sorted(experiment.glob("*/checkpoint_*/state.json")):
        state = read_json(state_file)  # {} while Tune is still copying it
        attempts = state.get("attempts") or [{}]
        if attempts[-1].get("node_id") == node_id and state.get("completed", 0) >= 1:
            return state_file.parent.parent, int(state["completed"])
    return None
