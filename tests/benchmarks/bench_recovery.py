"""Benchmark recovery on the tiny preset: one-shot vs iterative+masked vs Wanda+LoRA, and
the scaling of distributed (Ray Train FSDP) masked recovery with 1 vs 2 workers.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_recovery.py [--targets 0.5,0.8] [--skip-distributed]

Every row is one real `run_trial` in this process, so perplexity and wall time compare
directly. Writes results/bench_recovery.json and results/bench_recovery.md beside this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from raysparse.config import TrialConfig
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent
EVAL_WINDOWS = 40
TRAIN = dict(lr=1e-3, batch_size=8, train_samples=64, max_steps=8)


def variants(target: float) -> list[tuple[str, dict]]:
    return [
        ("one-shot magnitude", dict(method="magnitude")),
        ("one-shot wanda", dict(method="wanda")),
        ("one-shot sparsegpt", dict(method="sparsegpt")),
        ("iterative magnitude p=0.3 + masked", dict(method="magnitude", schedule="iterative", prune_percentage=0.3,
                                                    recovery="masked", **TRAIN)),
        ("wanda + LoRA r=8", dict(method="wanda", recovery="lora", epochs_per_iteration=2, **{**TRAIN, "lr": 3e-3})),
    ]


def run_row(name: str, target: float, overrides: dict) -> dict:
    config = TrialConfig(sparsity=str(target), eval_max_windows=EVAL_WINDOWS, **overrides)
    start = time.perf_counter()
    summary = run_trial(config).summary
    wall = time.perf_counter() - start
    return {"variant": name, "target": target, "iterations": summary["iterations"],
            "sparsity": round(summary["sparsity_measured"], 4), "ppl_dense": round(summary["ppl_dense"], 3),
            "ppl_pruned": round(summary["ppl_pruned"], 3), "ppl_final": round(summary["ppl_final"], 3),
            "wall_s": round(wall, 2)}


def distributed_scaling(steps: int = 24) -> dict:
    """Steps per second of masked recovery: in-process (1 worker) vs 2 Ray Train FSDP workers."""
    import ray

    from raysparse.models.loading import load_model
    from raysparse.prune import prune_magnitude
    from raysparse.recover.distributed.driver import train_masked_distributed
    from raysparse.recover.loop import TrainSettings
    from raysparse.recover.masked import train_masked
    from raysparse.sparsity.pattern import parse_sparsity

    windows = torch.randint(0, 1024, (steps * 8, 256), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(lr=1e-4, epochs=1, batch_size=8, keep_best=False)
    results = {}
    for workers in (1, 2):
        loaded = load_model("tiny")
        masks = prune_magnitude(loaded.adapter, parse_sparsity(0.5))
        start = time.perf_counter()
        if workers == 1:
            train_masked(loaded.model, masks, windows, settings, evaluate=None, progress=False)
        else:
            ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
            storage = Path(HERE / "results" / "_ray").resolve()
            train_masked_distributed(loaded.model, masks, windows, settings, None, workers=2,
                                     storage_path=str(storage), run_name=f"bench-{int(time.time())}")
        elapsed = time.perf_counter() - start
        results[workers] = {"seconds": round(elapsed, 2), "steps_per_s": round(steps / elapsed, 3)}
    results["ratio_2_over_1"] = round(results[2]["steps_per_s"] / results[1]["steps_per_s"], 3)
    return results


def to_markdown(rows: list[dict], scaling: dict | None) -> str:
    lines = ["| target | variant | iterations | sparsity | ppl dense | ppl pruned | ppl final | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['variant']} | {r['iterations']} | {r['sparsity']} | {r['ppl_dense']} | "
                     f"{r['ppl_pruned']} | {r['ppl_final']} | {r['wall_s']} |")
    if scaling:
        lines += ["", "| masked recovery | seconds (incl. start-up) | steps/s |", "|---|---|---|",
                  f"| 1 worker, in-process | {scaling[1]['seconds']} | {scaling[1]['steps_per_s']} |",
                  f"| 2 Ray Train FSDP workers | {scaling[2]['seconds']} | {scaling[2]['steps_per_s']} |",
                  f"| ratio 2 / 1 | | {scaling['ratio_2_over_1']} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.8")
    parser.add_argument("--skip-distributed", action="store_true")
    args = parser.parse_args()
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        for name, overrides in variants(target):
            row = run_row(name, target, overrides)
            print(json.dumps(row), flush=True)
            rows.append(row)
    scaling = None if args.skip_distributed else distributed_scaling()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "eval_windows": EVAL_WINDOWS}
    (out / "bench_recovery.json").write_text(json.dumps({"meta": meta, "rows": rows, "scaling": scaling}, indent=2))
    (out / "bench_recovery.md").write_text(to_markdown(rows, scaling) + "\n")
    print(to_markdown(rows, scaling))


if __name__ == "__main__":
    main()
