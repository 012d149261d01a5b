"""Can an early rung rank trials if it looks at where each trial is heading?

Run after bench_search.py (reads the trials of its no-early-stopping searches from its JSON):

    python tests/benchmarks/rung_projection.py [--from results/bench_search_wide.json] \
        [--searches random-seed0-full,random-seed1-full] [--workers 2] [--label NAME]

asha_replay.py found a trial's validation perplexity at 20-30% sparsity uncorrelated with
its final one (Spearman about 0): at low sparsity every recipe is still near the dense
model. This re-runs each recorded trial's configuration as a standalone trial (the same
code path as inside a search, seeded alike, so its final value must match the recorded
one) with `project_to_target`: after every iteration below the target the current model is
also pruned one-shot to the target and evaluated on validation text. For each rung it
gives the rank correlation with the final value of (a) the trial's own perplexity and (b)
the projected one, both interpolated to the rung as ASHA and Optuna see them
(`milestones.crossed_rungs`), and the extra wall time the projections cost.
Writes results/rung_projection.json and .md (or results/LABEL.*) beside this file.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import os
import time
from pathlib import Path

from asha_replay import rung_correlation

from raysparse.search.milestones import PROJECTED

RESULTS = Path(__file__).resolve().parent / "results"
RUNGS = (20, 25, 30, 40, 50, 60, 70)


def run_one(space_dict: dict, params: dict) -> dict:
    """One recorded trial again, standalone, with projections: its reports as a search sees them."""
    import torch

    torch.set_num_threads(1)
    from raysparse.search.space_file import parse_space
    from raysparse.search.trainable import _trial_metrics
    from raysparse.trial.runner import run_trial

    space = parse_space(space_dict, "recorded space")
    config = dataclasses.replace(space.sample_config(params), project_to_target=True, report_test=False, output=None)
    started = time.perf_counter()
    summary = run_trial(config).summary
    reports = [_trial_metrics(record) for record in summary["history"]]
    projection_s = (summary.get("timings_s") or {}).get("projection")
    return {"reports": reports, "wall_s": round(time.perf_counter() - started, 2), "projection_s": projection_s}


def rung_values(reports: list[dict], metric: str, rungs: tuple[int, ...]) -> dict[int, float]:
    from raysparse.search.milestones import crossed_rungs

    out: dict[int, float] = {}
    for report in reports:
        for rung, value in crossed_rungs(report, metric, list(rungs)):
            out.setdefault(rung, value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", type=Path, default=RESULTS / "bench_search_wide.json")
    parser.add_argument("--searches", default="random-seed0-full,random-seed1-full,random-seed2-full")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N trials of each search (a quick look)")
    parser.add_argument("--label", default="rung_projection")
    args = parser.parse_args()
    recorded = json.loads(args.source.read_text())
    space = recorded["settings"]["space"]
    names = args.searches.split(",")
    searches = {s["name"]: s for s in recorded["searches"] if s["name"] in names}
    missing = set(names) - set(searches)
    if missing:
        raise SystemExit(f"--searches {','.join(sorted(missing))}: not in {args.source} "
                         f"(it has {', '.join(s['name'] for s in recorded['searches'])})")
    keys = [k for k in space["params"]]
    jobs = []
    for name in names:
        rows = [t for t in searches[name]["trials"] if t["status"] == "completed"][: args.limit]
        jobs += [(name, t["index"], {k: t[k] for k in keys if k in t}, float(t["val_ppl"])) for t in rows]
    started = time.perf_counter()
    trials = []
    with futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = {pool.submit(run_one, space, params): (name, index, params, final) for name, index, params, final in jobs}
        for done in futures.as_completed(runs):
            name, index, params, final = runs[done]
            result = done.result()
            rerun_final = result["reports"][-1]["val_ppl"]
            trials.append({"search": name, "index": index, "params": params, "final": final, "rerun_final": rerun_final,
                           "wall_s": result["wall_s"], "projection_s": result["projection_s"],
                           "rungs": {m: rung_values(result["reports"], m, RUNGS) for m in ("val_ppl", PROJECTED)},
                           "reports": result["reports"]})
            print(f"{name} #{index}: final {final:.2f} (rerun {rerun_final:.2f}), {result['wall_s']:.0f} s", flush=True)
    trials.sort(key=lambda t: (names.index(t["search"]), t["index"]))
    # the reports by search, as asha_replay reads them: one correlation for both tools
    by_search: dict[str, dict[int, list[dict]]] = {}
    for t in trials:
        by_search.setdefault(t["search"], {})[t["index"]] = t["reports"]
    rho = {metric: rung_correlation(list(by_search.values()), list(RUNGS), metric)
           for metric in ("val_ppl", PROJECTED)}
    wall, projection = sum(t["wall_s"] for t in trials), sum(t["projection_s"] or 0 for t in trials)
    reproduced = sum(abs(t["rerun_final"] - t["final"]) <= 1e-3 * t["final"] for t in trials)
    out = {"source": str(args.source), "searches": names, "trials": trials, "spearman": rho,
           "projection_share_of_trial_wall": round(projection / wall, 3) if wall else None,
           "reproduced_final": f"{reproduced}/{len(trials)}", "wall_s": round(time.perf_counter() - started, 1),
           "workers": args.workers, "loadavg": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(out, indent=1))
    lines = [f"Trials of {', '.join(names)} ({args.source.name}) re-run standalone with projections "
             f"({len(trials)} trials, final value reproduced within 0.1% for {reproduced}), {args.workers} workers, "
             f"{out['wall_s']:.0f} s. Spearman rank correlation of a trial's value at each rung with its final "
             "validation perplexity:", "",
             "| rung % | own val ppl | projected to the target | trials |", "|---|---|---|---|"]
    for rung in RUNGS:
        count = sum(rung in t["rungs"]["val_ppl"] for t in trials)
        lines.append(f"| {rung} | {rho['val_ppl'].get(rung)} | {rho[PROJECTED].get(rung)} | {count} |")
    lines += ["", f"Projections took {100 * (out['projection_share_of_trial_wall'] or 0):.1f}% of the trials' wall time."]
    (RESULTS / f"{args.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
