"""Replay finished searches through raysparse's ASHA offline: what would other settings save and lose?

Run after bench_search.py (reads the experiment folders it left in its storage):

    python tests/benchmarks/asha_replay.py [--storage DIR] [--grace 20,25,30,40] [--reduction 2,3,4] [--label NAME]

A search without early stopping holds every trial's full history (one Tune report per
pruning iteration: sparsity_pct, val_ppl, the level and value before it, steps, time). This
feeds those reports, in the order two concurrent slots would produce them (a stopped trial
frees its slot at once), to the scheduler a search builds (`searcher.persistent_asha_class`,
rungs judged at interpolated values, `milestones.crossed_rungs`), for every (grace,
reduction factor) pair asked for, and compares the compute (training steps) and best
completed validation perplexity with the search that ran everything. It also gives the rank
correlation between a trial's value at each rung and its final value: how much an early
rung can know. Independent random searches concatenated are one larger random search, so the
full searches pooled (in each rotation of their order) show how the savings grow with the
budget, for grace 20 and 30 at reduction 2. Replaying an ASHA search's own histories with its own settings must reproduce
its real stops: that checks the replay. With `--histories-from results/rung_projection*.json
--metric val_ppl_projected` it replays rung_projection.py's re-runs of those trials, ranked at
the rungs by their projection to the target (`--rung-metric projected`).
Writes results/bench_search_asha_replay.json and .md (or results/LABEL.*) beside this file.
"""
from __future__ import annotations

import argparse
import heapq
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

from bench_search import OUT, trial_index
from scipy.stats import spearmanr

from raysparse.search.milestones import PROJECTED, asha_rungs, crossed_rungs
from raysparse.search.searcher import MAX_PCT, REDUCTION_FACTOR, persistent_asha_class

METRIC = "val_ppl"


def histories(experiment: Path) -> dict[int, list[dict]]:
    """Trial counter -> its Tune reports, in order."""
    out = {}
    for path in experiment.glob("*/result.json"):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if reports:
            out[trial_index({"trial_id": reports[0]["trial_id"], "path": str(path.parent)})] = reports
    return dict(sorted(out.items()))


def replay(hist: dict[int, list[dict]], grace: int, reduction: float, slots: int = 2, metric: str = METRIC,
           fidelity: str = "sparsity", max_t: int = MAX_PCT) -> dict:
    """Event-driven replay: trials start in counter order when a slot frees; ASHA sees each report."""
    asha = persistent_asha_class()(state_file=None, fidelity=fidelity, metric=metric, mode="min", max_t=max_t,
                                   grace_period=grace, reduction_factor=reduction)
    queue, events, last, done = list(hist), [], {}, set()

    def start(now: float) -> None:
        if queue:
            index = queue.pop(0)
            asha.on_trial_add(None, SimpleNamespace(trial_id=index))
            for k, report in enumerate(hist[index]):
                heapq.heappush(events, (now + report["time_total_s"], index, k))

    for _ in range(slots):
        start(0.0)
    while events:
        now, index, k = heapq.heappop(events)
        if index in done:
            continue
        report = hist[index][k]
        action = asha.on_trial_result(None, SimpleNamespace(trial_id=index), report)
        last[index] = report
        if action == "STOP" or k == len(hist[index]) - 1:
            done.add(index)
            start(now)
    rows = {i: {"status": "completed" if r.get("completed") else "stopped", "sparsity_pct": r["sparsity_pct"],
                "val_ppl": r[metric], "steps": r["train_steps_total"], "wall_s": r.get("wall_s_total") or 0.0}
            for i, r in last.items()}
    completed = [r["val_ppl"] for r in rows.values() if r["status"] == "completed"]
    return {"trials": rows, "steps": sum(r["steps"] for r in rows.values()), "wall_s": sum(r["wall_s"] for r in rows.values()),
            "best_val": min(completed) if completed else None, "completed": len(completed)}


def projection_histories(path: Path) -> dict[str, dict[int, list[dict]]]:
    """Search name -> trial counter -> reports, from rung_projection.py's re-runs (their wall
    time, projections included, stands for Tune's time_total_s)."""
    out: dict[str, dict[int, list[dict]]] = {}
    for trial in json.loads(path.read_text())["trials"]:
        reports = [{**r, "time_total_s": r["wall_s_total"]} for r in trial["reports"]]
        out.setdefault(trial["search"], {})[trial["index"]] = reports
    return {name: dict(sorted(hist.items())) for name, hist in out.items()}


def rung_correlation(all_hist: list[dict[int, list[dict]]], rungs: list[int], metric: str = METRIC,
                     fidelity: str = "sparsity") -> dict[int, float]:
    """Spearman correlation, over every fully run trial, of the value at a rung and the final value."""
    at: dict[int, list[tuple[float, float]]] = {rung: [] for rung in rungs}
    for hist in all_hist:
        for reports in hist.values():
            final = reports[-1][metric]
            for report in reports:
                for rung, value in crossed_rungs(report, metric, rungs, fidelity):
                    at[rung].append((value, final))
    return {rung: round(float(spearmanr(*zip(*pairs)).statistic), 3) for rung, pairs in at.items() if len(pairs) > 2}


def pooled_replays(all_hist: list[dict[int, list[dict]]], metric: str = METRIC, fidelity: str = "sparsity",
                   max_t: int = MAX_PCT) -> list[dict]:
    """The full searches concatenated, in each rotation of their order: larger random searches."""
    rows = []
    searches = [list(h.values()) for h in all_hist]
    for start in range(len(searches)):
        pooled = [reports for k in range(len(searches)) for reports in searches[(start + k) % len(searches)]]
        hist = {i + 1: reports for i, reports in enumerate(pooled)}
        steps = sum(h[-1]["train_steps_total"] for h in pooled)
        best = min(h[-1][metric] for h in pooled)
        for grace in ((1, 2) if fidelity == "epochs" else (20, 30)):
            r = replay(hist, grace, REDUCTION_FACTOR, metric=metric, fidelity=fidelity, max_t=max_t)
            rows.append({"trials": len(hist), "first": start, "grace": grace, "steps_ratio": round(r["steps"] / steps, 3),
                         "best_gap_pct": None if r["best_val"] is None else round(100 * (r["best_val"] / best - 1), 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, default=None)
    parser.add_argument("--grace", default=None,
                        help="first rungs to try, in percent sparsity (20,25,30,40) or epochs (1,2,3)")
    parser.add_argument("--fidelity", choices=("sparsity", "epochs"), default="sparsity",
                        help="what the rungs count: the searches must have run with this --fidelity (epochs: "
                             "one report per recovery epoch)")
    parser.add_argument("--max-epochs", type=int, default=8,
                        help="with --fidelity epochs: the recovery epochs of the space's trials")
    parser.add_argument("--reduction", default="2,3,4", help="ASHA reduction factors to try")
    parser.add_argument("--ran-grace", type=int, default=20,
                        help="the first rung the storage's ASHA searches ran with (the recorded runs: 20)")
    parser.add_argument("--label", default="bench_search_asha_replay",
                        help="results/LABEL.{json,md} (e.g. bench_search_wide_asha_replay for a --space run)")
    parser.add_argument("--metric", default=METRIC, choices=(METRIC, PROJECTED),
                        help="what the rungs compare (val_ppl_projected: --rung-metric projected; needs "
                             "--histories-from)")
    parser.add_argument("--histories-from", type=Path, default=None,
                        help="a rung_projection.py JSON: replay its re-run trials (which carry the projected "
                             "values) instead of the storage's experiments")
    args = parser.parse_args()
    if args.metric == PROJECTED and args.histories_from is None:
        raise SystemExit("--metric val_ppl_projected needs --histories-from results/rung_projection*.json "
                         "(the recorded searches did not measure projections)")
    metric, fidelity = args.metric, args.fidelity
    max_t = args.max_epochs - 1 if fidelity == "epochs" else MAX_PCT  # as searcher.asha_bounds
    graces = args.grace or ("1,2,3" if fidelity == "epochs" else "20,25,30,40")
    if args.histories_from is not None:
        result: dict = {"histories_from": str(args.histories_from), "metric": metric, "checks": [], "sweep": []}
        full = projection_histories(args.histories_from)
    else:
        storage = args.storage or Path(json.loads((OUT / "bench_search.json").read_text())["storage"])
        result = {"storage": str(storage), "metric": metric, "checks": [], "sweep": []}
        default = (args.ran_grace, REDUCTION_FACTOR)
        for experiment in sorted(storage.glob("*-asha")):  # the replay must reproduce what ASHA did
            hist = histories(experiment)
            same = replay(hist, *default, fidelity=fidelity, max_t=max_t)
            real = {i: ("completed" if h[-1].get("completed") else "stopped") for i, h in hist.items()}
            result["checks"].append({"search": experiment.name, "trials": len(hist), "agree": sum(
                same["trials"][i]["status"] == real[i] for i in hist)})
        full = {e.name: histories(e) for e in sorted(storage.glob("*-full"))}
    for grace in (int(g) for g in graces.split(",")):
        for reduction in (float(r) for r in args.reduction.split(",")):
            per_search = []
            for name, hist in full.items():
                steps = sum(h[-1]["train_steps_total"] for h in hist.values())
                best = min(h[-1][metric] for h in hist.values())
                wall = sum(h[-1].get("wall_s_total") or 0.0 for h in hist.values())
                r = replay(hist, grace, reduction, metric=metric, fidelity=fidelity, max_t=max_t)
                per_search.append({"search": name, "steps_ratio": round(r["steps"] / steps, 3),
                                   "wall_ratio": round(r["wall_s"] / wall, 3) if wall else None,
                                   "best_gap_pct": None if r["best_val"] is None
                                   else round(100 * (r["best_val"] / best - 1), 2), "completed": r["completed"]})
            gaps = [p["best_gap_pct"] for p in per_search if p["best_gap_pct"] is not None]
            result["sweep"].append({"grace": grace, "reduction": reduction, "rungs": asha_rungs(grace, reduction, max_t),
                                    "median_steps_ratio": round(statistics.median(p["steps_ratio"] for p in per_search), 3),
                                    "median_wall_ratio": round(statistics.median(p["wall_ratio"] or 0 for p in per_search), 3),
                                    "median_best_gap_pct": statistics.median(gaps) if gaps else None,
                                    "worst_best_gap_pct": max(gaps) if gaps else None, "per_search": per_search})
    result["fidelity"] = fidelity
    result["pooled"] = pooled_replays(list(full.values()), metric, fidelity, max_t)
    rungs = list(range(1, args.max_epochs)) if fidelity == "epochs" else [20, 25, 30, 40, 50, 60, 70]
    result["rung_vs_final_spearman"] = rung_correlation(list(full.values()), rungs, metric, fidelity)
    (OUT / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Replays of {len(full)} searches run without early stopping ({', '.join(full)}), two slots, rungs "
             f"compared on {metric}; steps ratio = training steps with ASHA / without; wall ratio = the trials' wall "
             "time with ASHA / without (projections included where measured); gap = best completed validation ppl "
             "vs the no-early-stopping best (target: ratio <= 0.5 at gap <= 2%).", "",
             f"| grace ({fidelity}) | reduction | rungs | steps ratio (median) | wall ratio (median) | best gap % (median) | "
             "worst gap % | per search (ratio, gap %, completed) |", "|---|---|---|---|---|---|---|---|"]
    for s in result["sweep"]:
        detail = "; ".join(f"{p['steps_ratio']}, {p['best_gap_pct']}, {p['completed']}" for p in s["per_search"])
        lines.append(f"| {s['grace']} | {s['reduction']:g} | {s['rungs']} | {s['median_steps_ratio']} | "
                     f"{s['median_wall_ratio']} | {s['median_best_gap_pct']} | {s['worst_best_gap_pct']} | {detail} |")
    lines += ["", "Pooled (the full searches concatenated: one random search of "
              f"{result['pooled'][0]['trials'] if result['pooled'] else 0} trials, each rotation), steps ratio / gap %: "
              + "; ".join(f"grace {p['grace']}, from search {p['first']}: {p['steps_ratio']} / {p['best_gap_pct']}"
                          for p in result["pooled"])]
    unit = " epoch(s)" if fidelity == "epochs" else "%"
    rung_name = "a recovery-epoch rung" if fidelity == "epochs" else "a sparsity rung"
    lines += ["", f"Rank correlation (Spearman) of a trial's {metric} at {rung_name} with its final validation "
              "ppl: " + ", ".join(f"{rung}{unit}: {rho}" for rung, rho in result["rung_vs_final_spearman"].items())]
    if result["checks"]:
        lines += ["", f"Replay check (ASHA searches replayed with grace {args.ran_grace}, reduction 2; trials whose real "
                  "status it reproduces): " + ", ".join(f"{c['search']} {c['agree']}/{c['trials']}"
                                                      for c in result["checks"])]
    (OUT / f"{args.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
