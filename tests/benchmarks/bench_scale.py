"""Benchmark multi-node searches on loopback: scale-out overhead and the cost of losing a node.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_scale.py [--num-samples 6]

Every variant runs the same search (`launch/search.py --address ...`, a tiny iterative
space of 4 pruning + recovery iterations per trial, no early stopping, so every trial does
the same work) on a cluster of `ray start` nodes on this machine, with the same total CPUs:
(a) one node with 2 CPUs, (b) a head and a worker with 1 CPU each (trials per hour, ratio
b/a), (c) as (b), but the worker node is SIGKILLed once a trial on it has checkpointed an
iteration (time lost = (c - b) / b; the retried trial resumes from its checkpoint on the
head). It also runs `--plan` on (a) and compares its estimate with (a)'s measured time.
Wall times include the driver process start and Ray connection. Writes
results/bench_scale.json and results/bench_scale.md next to this file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from loopback import start_cluster, trial_checkpointed_on  # noqa: E402

SPACE = """
fixed:
  model: tiny
  method: magnitude
  schedule: iterative
  sparsity: 0.6
  prune_percentage: 0.21      # 4 iterations
  recovery: masked
  train_samples: 32
  max_steps: 4
  batch_size: 8
  eval_max_windows: 8
params:
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""
FAST_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def search_args(address: str, space: Path, storage: Path, name: str, num_samples: int) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "search.py"), "--space", str(space), "--address", address,
            "--num-samples", str(num_samples), "--max-concurrent", "2", "--max-failures", "2",
            "--storage", str(storage), "--name", name, "--no-early-stopping"]


def run_variant(name: str, cpus: list[float], space: Path, storage: Path, num_samples: int,
                kill_worker: bool = False, plan: bool = False) -> dict:
    cluster = start_cluster(head_cpus=cpus[0], worker_cpus=cpus[1:], system_config=FAST_DEATH)
    row: dict = {"variant": name, "nodes": len(cpus), "cpus": sum(cpus)}
    try:
        if plan:
            out = subprocess.run(search_args(cluster.address, space, storage, name + "-plan", num_samples) + ["--plan"],
                                 env=cluster.env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-2000:]
            total = [line for line in out.stdout.splitlines() if line.startswith("total")][0]
            row["plan_total"] = total.split("(")[0].replace("total", "").strip()
            row["plan_output"] = out.stdout
        started = time.perf_counter()
        proc = subprocess.Popen(search_args(cluster.address, space, storage, name, num_samples), env=cluster.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if kill_worker:
            victim = cluster.worker_node_ids[0]
            experiment = storage / name
            while proc.poll() is None:
                if trial_checkpointed_on(experiment, victim):
                    row["killed_after_s"] = round(time.perf_counter() - started, 1)
                    cluster.kill_node(victim)
                    break
                time.sleep(0.2)
        output, _ = proc.communicate(timeout=1200)
        row["wall_s"] = round(time.perf_counter() - started, 1)
    finally:
        cluster.stop()
    assert proc.returncode == 0, output[-3000:]
    import pyarrow.csv as pacsv

    rows = pacsv.read_csv(storage / name / "results.csv").to_pylist()
    row.update(trials=len(rows), completed=sum(r["status"] == "completed" for r in rows),
               retried=sum((r["attempt"] or 1) > 1 for r in rows),
               nodes_used=len({r["node_id"] for r in rows}),
               trials_per_hour=round(len(rows) / row["wall_s"] * 3600, 1))
    print(json.dumps({k: v for k, v in row.items() if k != "plan_output"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=6)
    args = parser.parse_args()
    from raysparse.models.tiny import ensure_tiny_model

    ensure_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="raysparse-bench-scale-"))
    space = work / "space.yaml"
    space.write_text(SPACE)
    one = run_variant("1 node x 2 CPU", [2], space, work / "runs", args.num_samples, plan=True)
    two = run_variant("2 nodes x 1 CPU", [1, 1], space, work / "runs", args.num_samples)
    lost = run_variant("2 nodes x 1 CPU, worker killed", [1, 1], space, work / "runs", args.num_samples,
                       kill_worker=True)
    result = {
        "num_samples": args.num_samples, "rows": [one, two, lost],
        "trials_per_hour_ratio_2nodes_over_1": round(two["trials_per_hour"] / one["trials_per_hour"], 3),
        "node_failure_wall_ratio": round(lost["wall_s"] / two["wall_s"], 3),
        "node_failure_time_lost_s": round(lost["wall_s"] - two["wall_s"], 1),
        "plan_estimate_for_1_node": one.get("plan_total"), "measured_1_node_s": one["wall_s"],
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_scale.json").write_text(json.dumps(result, indent=2))
    lines = ["| variant | nodes | CPUs | trials | completed | retried | nodes used | wall s | trials/hour |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['nodes']} | {r['cpus']:g} | {r['trials']} | {r['completed']} | {r['retried']} | "
              f"{r['nodes_used']} | {r['wall_s']} | {r['trials_per_hour']} |" for r in result["rows"]]
    lines += ["", f"trials/hour, 2 nodes / 1 node (same CPUs): {result['trials_per_hour_ratio_2nodes_over_1']}",
              f"node failure: wall {result['node_failure_wall_ratio']}x the clean 2-node run "
              f"({result['node_failure_time_lost_s']} s lost; worker killed {lost.get('killed_after_s')} s in)",
              f"--plan estimate for the 1-node run: {result['plan_estimate_for_1_node']} (measured {one['wall_s']} s)"]
    (out / "bench_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
