"""Benchmark the search on the tiny preset (default space): quality, overhead, cache.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_search.py [--num-samples 16]

(a) quality: best final perplexity of an Optuna (TPE) search vs a random search with the
    same number of trials and vs the hand-run default configuration (p=0.1, 3 epochs per
    iteration), with the compute each used (sum of trial wall times);
(b) overhead: search wall time / sum of its trials' own times;
(c) cache: the dense-perplexity phase in the trial that computed it vs trials that hit.
Writes results/bench_search.json and results/bench_search.md next to this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from statistics import mean

import ray

from raysparse.config import TrialConfig
from raysparse.search.runner import run_search
from raysparse.search.settings import DEFAULT_SPACE, SearchSettings
from raysparse.search.space_file import load_space
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent


def trial_summaries(experiment: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in Path(experiment).glob("*/checkpoint_*/summary.json")]


def tune_trial_seconds(experiment: str) -> float:
    """Each trial's own running time as Tune measured it (stopped trials included)."""
    total = 0.0
    for path in Path(experiment).glob("*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            total += json.loads(lines[-1]).get("time_total_s", 0.0)
    return total


def search_row(name: str, report: dict) -> dict:
    trial_seconds = tune_trial_seconds(report["experiment"])
    completed = [r["final_ppl"] for r in report["rows"] if r["status"] == "completed"]
    return {"variant": name, "trials": len(report["rows"]), "completed": len(completed),
            "stopped": sum(r["status"] == "stopped" for r in report["rows"]),
            "best_final_ppl": round(min(completed), 3) if completed else None,
            "search_wall_s": report["wall_s"], "trial_s_sum": round(trial_seconds, 1),
            "cache": report.get("cache")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-concurrent", type=int, default=2)
    args = parser.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="raysparse-bench-search-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    reports = {}
    for searcher in ("optuna", "random"):
        settings = SearchSettings(num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                                  storage=str(storage), name=searcher, searcher=searcher, seed=0)
        reports[searcher] = run_search(settings)
        rows.append(search_row(f"{searcher} search", reports[searcher]))
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()

    fixed = load_space(DEFAULT_SPACE).fixed
    config = dataclasses.replace(TrialConfig.from_dict(fixed), prune_percentage=0.1,
                                 epochs_per_iteration=3, lr=1e-4)
    start = time.perf_counter()
    summary = run_trial(config).summary
    default_s = time.perf_counter() - start
    rows.append({"variant": "hand-run default (p=0.1, 3 epochs, lr 1e-4)", "trials": 1, "completed": 1, "stopped": 0,
                 "best_final_ppl": round(summary["ppl_final"], 3), "search_wall_s": round(default_s, 1),
                 "trial_s_sum": round(default_s, 1), "cache": None})

    optuna_summaries = trial_summaries(reports["optuna"]["experiment"])
    computed = [s["timings_s"]["eval_dense"] for s in optuna_summaries
                if s.get("stats_cache") and s["stats_cache"][0]["outcome"] == "computed"]
    hits = [s["timings_s"]["eval_dense"] for s in optuna_summaries
            if s.get("stats_cache") and s["stats_cache"][0]["outcome"] == "hit"]
    cache = {"dense_eval_s_computed": round(mean(computed), 3) if computed else None,
             "dense_eval_s_hit": round(mean(hits), 4) if hits else None}
    if computed and hits:
        cache["ratio_hit_over_computed"] = round(mean(hits) / mean(computed), 4)
    overhead = {name: round(r["search_wall_s"] / r["trial_s_sum"], 3)
                for name, r in zip(("optuna", "random"), rows[:2]) if r["trial_s_sum"]}
    result = {"rows": rows, "cache": cache, "wall_over_trial_sum": overhead, "num_samples": args.num_samples,
              "max_concurrent": args.max_concurrent}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_search.json").write_text(json.dumps(result, indent=2))
    lines = ["| variant | trials | completed | stopped early | best final ppl | wall s | sum of trial s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['trials']} | {r['completed']} | {r['stopped']} | {r['best_final_ppl']} | "
              f"{r['search_wall_s']} | {r['trial_s_sum']} |" for r in rows]
    lines += ["", f"search wall time / sum of trial times: {overhead}",
              f"dense perplexity phase: computed {cache['dense_eval_s_computed']} s, cache hit "
              f"{cache['dense_eval_s_hit']} s (ratio {cache.get('ratio_hit_over_computed')})"]
    (out / "bench_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
