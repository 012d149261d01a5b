"""Benchmark the shared cache: searches on a two-node loopback cluster with object storage.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_cache.py [--num-samples 8] [--model stories260K|tiny]

Two `ray start` nodes on loopback (tests/loopback.py), one trial slot each, and
`--storage file://...`: the trials share no folder for the cache, the coordinator on the
driver's node serves every value through the object store. Measured:
(a) per kind, how often a value was computed vs served across the cluster (each key once);
(b) what serving a value cost next to computing it (removal importance is the headline);
(c) the one-shot + LoRA space prunes once per distinct pruning setting (method x alpha),
    whatever the LoRA rank and lr;
(d) trials per hour with the cache and with --no-cache;
(e) a second search over the same storage computes nothing (same searcher seed).
Writes results/bench_cache.json and results/bench_cache.md next to this file.
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
sys.path.insert(0, str(HERE.parent))  # tests/: the loopback cluster helper

from loopback import start_cluster  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

SPACE = """
description: bench_cache - one-shot {methods} x alpha with importance-based ratios, LoRA recovery
fixed:
  model: {model}
  schedule: oneshot
  sparsity: 0.5
  recovery: lora
  pruning_strategy: inverse
  min_pruning_rate: 0.2
  max_pruning_rate: 0.8
  importance_samples: {importance_samples}
  nsamples: 16
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 8
  lora_target_modules: q_proj,v_proj
{data}params:
  method: {{choice: [{methods}]}}
  alpha: {{choice: [1.0, 2.0]}}
  lora_r: {{choice: [4, 8]}}
  lr: {{loguniform: [1.0e-4, 1.0e-3]}}
"""


def model_and_data(name: str, folder: Path) -> tuple[str, str]:
    """The model and the fixed lines naming its texts (stories260K: three disjoint TinyStories parts)."""
    if name == "tiny":
        return "tiny", ""
    model_dir = SHARED / "stories260K" / "hf"
    text = (SHARED / "tinystories_valid" / "tinystories_val.txt").read_text(encoding="utf-8")
    quarter = len(text) // 4
    parts = {"calib_data": text[:quarter], "val_data": text[quarter:2 * quarter], "eval_data": text[2 * quarter:]}
    lines = ""
    for key, part in parts.items():
        path = folder / f"{key}.txt"
        path.write_text(part, encoding="utf-8")
        lines += f"  {key}: {path}\n"
    return str(model_dir), lines + "  seqlen: 256\n  eval_seqlen: 256\n"


def run_search(cluster, space: Path, storage: str, name: str, samples: int, extra: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "search.py"), "--space", str(space),
                           "--address", cluster.address, "--num-samples", str(samples), "--max-concurrent", "2",
                           "--storage", storage, "--name", name, "--no-early-stopping", "--searcher", "random",
                           "--seed", "0", "--max-failures", "0", *extra],
                          env={**cluster.env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"search {name} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "stdout": proc.stdout}


def read_experiment(bucket: Path, name: str) -> dict:
    import pyarrow.csv as pacsv

    folder = bucket / name
    rows = pacsv.read_csv(folder / "results.csv").to_pylist()
    stats_file = folder / "cache_stats.json"
    return {"rows": rows, "cache": json.loads(stats_file.read_text()) if stats_file.is_file() else None}


def per_kind(cache: dict) -> dict:
    """Mean seconds per computation and per serve, and their ratio, for each kind."""
    out = {}
    for kind, s in cache["by_kind"].items():
        compute = s["compute_s"] / s["computed"] if s["computed"] else None
        serve = s["serve_s"] / s["served"] if s["served"] else None
        out[kind] = {"computed": s["computed"], "served": s["served"], "read_from_storage": s["read_from_storage"],
                     "compute_s_mean": None if compute is None else round(compute, 4),
                     "serve_s_mean": None if serve is None else round(serve, 4),
                     "serve_over_compute": round(serve / compute, 4) if compute and serve is not None else None,
                     "saved_s": s["saved_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--model", default="stories260K" if (SHARED / "stories260K").exists() else "tiny")
    parser.add_argument("--importance-samples", type=int, default=64)
    parser.add_argument("--methods", default="wanda, magnitude")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raysparse-bench-cache-"))
    model, data = model_and_data(args.model, work)
    space = work / "space.yaml"
    space.write_text(SPACE.format(model=model, data=data, methods=args.methods,
                                  importance_samples=args.importance_samples))
    bucket = work / "bucket"
    storage = bucket.as_uri()
    cluster = start_cluster(head_cpus=1, worker_cpus=[1])
    runs: dict[str, dict] = {}
    try:
        for name, extra in (("cache_on", []), ("second_search", []), ("cache_off", ["--no-cache"])):
            runs[name] = {**run_search(cluster, space, storage, name, args.num_samples, extra),
                          **read_experiment(bucket, name)}
            print(f"{name}: {runs[name]['wall_s']} s", flush=True)
    finally:
        cluster.stop()

    on, again = runs["cache_on"], runs["second_search"]
    settings = {(r["param_method"], r["param_alpha"]) for r in on["rows"]}
    result = {
        "model": args.model, "num_samples": args.num_samples, "importance_samples": args.importance_samples,
        "nodes": 2, "storage": "file:// URI (object storage code path); no folder shared for the cache",
        "trial_nodes": len({r["node_id"] for r in on["rows"] if r.get("node_id")}),
        "completed": {name: sum(r["status"] == "completed" for r in run["rows"]) for name, run in runs.items()},
        "per_kind": per_kind(on["cache"]),
        "distinct_pruning_settings": len(settings),
        "prune_masks_computed": on["cache"]["by_kind"].get("prune_masks", {}).get("computed"),
        "memory": on["cache"]["memory"],
        "second_search_computed": again["cache"]["misses"],
        "second_search_per_kind": per_kind(again["cache"]),
        "wall_s": {name: run["wall_s"] for name, run in runs.items()},
        "trials_per_hour": {name: round(len(run["rows"]) / run["wall_s"] * 3600, 1) for name, run in runs.items()},
        "cache_report": on["stdout"].split("cache:", 1)[-1].splitlines()[:12] if "cache:" in on["stdout"] else [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cache.json").write_text(json.dumps(result, indent=2))
    (out / "bench_cache.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# bench_cache: {r['num_samples']} trials of one-shot + LoRA on {r['model']}, two loopback nodes, "
             "file:// storage", "",
             f"Trials ran on {r['trial_nodes']} node(s); completed: {r['completed']}.", "",
             "| kind | computed | served | from storage | compute s (mean) | serve s (mean) | serve / compute | saved s |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, s in r["per_kind"].items():
        lines.append(f"| {kind} | {s['computed']} | {s['served']} | {s['read_from_storage']} | {s['compute_s_mean']} | "
                     f"{s['serve_s_mean']} | {s['serve_over_compute']} | {s['saved_s']} |")
    lines += ["", f"Pruning: {r['prune_masks_computed']} computed for {r['distinct_pruning_settings']} distinct "
              "(method, alpha) settings.",
              f"Object store: peak {r['memory']['peak_bytes']} bytes of a {r['memory']['limit_bytes']} cap, "
              f"{r['memory']['evicted']} evicted.",
              f"Second search over the same storage: {r['second_search_computed']} computed.", "",
              "| run | wall s | trials/hour |", "|---|---|---|"]
    for name in r["wall_s"]:
        lines.append(f"| {name} | {r['wall_s'][name]} | {r['trials_per_hour'][name]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
