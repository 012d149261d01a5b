"""Replay finished searches through Ray's ASHA bracket offline: which trials does it stop, and why?

Run after bench_search.py (reads the experiment folders it left in its temp storage):

    python tests/benchmarks/asha_replay.py [--storage DIR]

Each search without early stopping holds every trial's full history (one Tune report per
pruning iteration: sparsity_pct, val_ppl, steps, time). This feeds those reports, in the
order two concurrent slots would produce them (a stopped trial frees its slot at once),
to the same `_Bracket` raysparse's ASHAScheduler builds (grace 20, reduction 2, max_t 101),
once as configured (stop_last_trials=True) and once with stop_last_trials=False. With
True, a trial whose first report lands past a higher rung (p >= 0.4: 40-50% sparsity, rung
40) is compared at the skipped lower rung (20) at its *next* report, against values other
trials recorded at 25-39% sparsity, and is almost always stopped. Replaying an ASHA search's
own histories with True must reproduce its real stops: that checks the replay.
Writes results/bench_search_asha_replay.json and .md beside this file.
"""
from __future__ import annotations

import argparse
import heapq
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

from bench_search import OUT, trial_index
from ray.tune.schedulers.async_hyperband import _Bracket


def histories(experiment: Path) -> dict[int, list[dict]]:
    """Trial counter -> its Tune reports, in order."""
    out = {}
    for path in experiment.glob("*/result.json"):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if reports:
            out[trial_index({"trial_id": reports[0]["trial_id"], "path": str(path.parent)})] = reports
    return dict(sorted(out.items()))


def replay(hist: dict[int, list[dict]], stop_last_trials: bool, slots: int = 2) -> dict:
    """Event-driven replay: trials start in counter order when a slot frees; ASHA sees each report."""
    bracket = _Bracket(min_t=20, max_t=101, reduction_factor=2, s=0, stop_last_trials=stop_last_trials)
    queue, events, last = list(hist), [], {}

    def start(now: float) -> None:
        if queue:
            index = queue.pop(0)
            for k, report in enumerate(hist[index]):
                heapq.heappush(events, (now + report["time_total_s"], index, k))

    for _ in range(slots):
        start(0.0)
    done = set()
    while events:
        now, index, k = heapq.heappop(events)
        if index in done:
            continue
        report = hist[index][k]
        action = bracket.on_result(SimpleNamespace(trial_id=index), report["sparsity_pct"], -report["val_ppl"])
        last[index] = report
        if action == "STOP" or k == len(hist[index]) - 1:
            done.add(index)
            start(now)
    rows = {i: {"status": "completed" if r.get("completed") else "stopped", "sparsity_pct": r["sparsity_pct"],
                "val_ppl": r["val_ppl"], "steps": r["train_steps_total"]} for i, r in last.items()}
    completed = [r["val_ppl"] for r in rows.values() if r["status"] == "completed"]
    return {"trials": rows, "steps": sum(r["steps"] for r in rows.values()),
            "best_val": min(completed) if completed else None, "completed": len(completed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, default=None)
    args = parser.parse_args()
    storage = args.storage or Path(json.loads((OUT / "bench_search.json").read_text())["storage"])
    result = {"storage": str(storage), "checks": [], "replays": []}
    for experiment in sorted(storage.glob("*-asha")):  # the replay must reproduce what ASHA did
        hist = histories(experiment)
        same = replay(hist, stop_last_trials=True)
        real = {i: ("completed" if h[-1].get("completed") else "stopped") for i, h in hist.items()}
        result["checks"].append({"search": experiment.name, "trials": len(hist), "agree": sum(
            same["trials"][i]["status"] == real[i] for i in hist)})
    for experiment in sorted(storage.glob("*-full")):
        hist = histories(experiment)
        full = {"steps": sum(h[-1]["train_steps_total"] for h in hist.values()),
                "best_val": min(h[-1]["val_ppl"] for h in hist.values())}
        row = {"search": experiment.name, "no_early_stopping": full}
        for flag in (True, False):
            r = replay(hist, stop_last_trials=flag)
            row[f"stop_last_trials={flag}"] = {
                "steps_ratio": round(r["steps"] / full["steps"], 3), "best_val": r["best_val"],
                "best_gap_pct": None if r["best_val"] is None else round(100 * (r["best_val"] / full["best_val"] - 1), 2),
                "completed": r["completed"],
                "stopped_p_ge_0.4": sum(r["trials"][i]["status"] == "stopped" for i, h in hist.items()
                                        if h[0]["config"]["prune_percentage"] >= 0.4),
                "p_ge_0.4": sum(h[0]["config"]["prune_percentage"] >= 0.4 for h in hist.values())}
        result["replays"].append(row)
    for flag in (True, False):
        key = f"stop_last_trials={flag}"
        result[f"median_{key}"] = {m: statistics.median(r[key][m] for r in result["replays"] if r[key][m] is not None)
                                   for m in ("steps_ratio", "best_gap_pct")}
    (OUT / "bench_search_asha_replay.json").write_text(json.dumps(result, indent=2))
    lines = ["| search | steps ratio (as configured) | best gap % | stopped p>=0.4 | steps ratio "
             "(stop_last_trials=False) | best gap % | stopped p>=0.4 |", "|---|---|---|---|---|---|---|"]
    for r in result["replays"]:
        a, b = r["stop_last_trials=True"], r["stop_last_trials=False"]
        lines.append(f"| {r['search']} | {a['steps_ratio']} | {a['best_gap_pct']} | {a['stopped_p_ge_0.4']}/"
                     f"{a['p_ge_0.4']} | {b['steps_ratio']} | {b['best_gap_pct']} | {b['stopped_p_ge_0.4']}/"
                     f"{b['p_ge_0.4']} |")
    lines += ["", "Replay check (ASHA searches replayed as configured; trials whose real status it reproduces): "
              + ", ".join(f"{c['search']} {c['agree']}/{c['trials']}" for c in result["checks"])]
    (OUT / "bench_search_asha_replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
