"""Benchmark a search that earns its keep: TPE vs random vs QMC, ASHA vs none, vs hand recipes.

Run on demand (not part of the test suite; about 80 min on 2 idle cores):

    python tests/benchmarks/bench_search.py [--num-samples 24] [--seeds 3] [--hand full|quick|skip]
    python tests/benchmarks/bench_search.py --resume /tmp/raysparse-bench-search-XXXX [--no-new-runs]

`--resume` continues a run that was cut short from its storage folder (the hand recipes and
every finished search are kept; `--no-new-runs` only re-summarises what is there).

On the default space (tiny preset, iterative pruning to 80%, masked recovery):
(1) Optuna TPE, random and scrambled-Sobol (qmc) searches at an equal trial budget, each with
    several search seeds, ASHA on: the best-so-far validation perplexity per trial started;
(2) random search with ASHA off for the same seeds: a seeded random sampler draws the same
    configurations whatever the scheduler does, so the two differ only in early stopping;
(3) TPE with ASHA off for the same seeds (does stopping at early rungs mislead the model?);
(4) the hand recipes users run today (p=0.1, 3 epochs per iteration, uniform, lr 1e-5 and 1e-3).
Searches decide on validation text; the chosen configuration's test perplexity comes from
the search's final evaluation, the hand recipes' from `run_trial` (report_test is on).
Writes results/bench_search.json, .md and bench_search_curves.png beside this file (`--label`
names them otherwise; `--space` runs another space, `--hand-from` reuses a run's hand recipes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

from raysparse.search.runner import run_search
from raysparse.search.settings import DEFAULT_SPACE, SearchSettings
from raysparse.search.space_file import load_space
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
# (searcher, ASHA): an equal budget for the three samplers; random also without early stopping.
# TPE without early stopping: does ASHA's stopping at uninformative early rungs mislead TPE?
# (searcher, mode): asha (early stopping; stopped trials told PRUNED), full (no early stopping),
# ignore (ASHA, stopped trials told FAIL so TPE models only finished ones: --stopped-trials ignore)
VARIANTS = (("optuna", "asha"), ("random", "asha"), ("random", "full"), ("qmc", "asha"), ("optuna", "full"),
            ("optuna", "ignore"))
MODE_LABELS = {"asha": "ASHA", "full": "no early stopping", "ignore": "ASHA, stopped trials ignored"}
HAND = {"hand p=0.1, 3 ep, lr 1e-5 (seed 001)": dict(lr=1e-5),
        "hand p=0.1, 3 ep, lr 1e-3": dict(lr=1e-3)}
# The seed's recipe is iterative pruning, whatever the space's own schedule (a one-shot space's
# fixed settings otherwise: the same data, step and evaluation budgets).
HAND_BASE = dict(method="magnitude", schedule="iterative", prune_percentage=0.1, epochs_per_iteration=3,
                 pruning_strategy="uniform")
QUICK_HAND = dict(prune_percentage=0.5, epochs_per_iteration=1)  # smoke runs: 3 iterations, not 16 x 3 epochs


def trial_index(row: dict) -> int:
    """Tune numbers trials in the order the searcher suggested (and started) them: the trial's
    folder is `search_trainable_<trial id>_<counter>_<params>_<date>`, the counter from 1."""
    name, trial_id = Path(str(row.get("path") or "")).name, str(row.get("trial_id") or "")
    match = re.search(rf"{re.escape(trial_id)}_(\d+)(?:_|$)", name) if trial_id else None
    if match is None:
        raise ValueError(f"no trial counter after trial id {trial_id!r} in {name!r}")
    return int(match.group(1))


def best_so_far(rows: list[dict]) -> list[float | None]:
    """Best *completed* validation ppl among the first k trials started, k = 1..N.

    A stopped trial's ppl was measured at a lower sparsity milestone, so it never counts.
    """
    curve, best = [], None
    for row in sorted(rows, key=trial_index):
        if row["status"] == "completed" and row.get("val_ppl") is not None:
            best = row["val_ppl"] if best is None else min(best, row["val_ppl"])
        curve.append(best)
    return curve


def tune_trial_seconds(experiment: str) -> float:
    """Each trial's own running time as Tune measured it (stopped trials included)."""
    total = 0.0
    for path in Path(experiment).glob("*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            total += json.loads(lines[-1]).get("time_total_s", 0.0)
    return total


def one_search(args, storage: Path, searcher: str, seed: int, mode: str) -> dict:
    """One search; keep what the report needs (rows in start order, chosen config, compute)."""
    name, asha = f"{searcher}-seed{seed}-{mode}", mode != "full"
    settings = SearchSettings(searcher=searcher, seed=seed, num_samples=args.num_samples,
                              max_concurrent=args.max_concurrent, early_stopping=asha, storage=str(storage), name=name,
                              grace_sparsity_pct=args.grace_sparsity_pct, fidelity=args.fidelity,
                              grace_epochs=args.grace_epochs, reduction_factor=args.reduction_factor,
                              stopped_trials="ignore" if mode == "ignore" else "pruned", space=str(args.space))
    report = run_search(settings)
    rows = sorted(report["rows"], key=trial_index)
    best = report["best"] or {}
    keep = ("status", "val_ppl", "sparsity", "train_steps_total", "wall_s_total")
    result = {
        "name": name, "searcher": searcher, "seed": seed, "asha": asha, "mode": mode, "wall_s": report["wall_s"],
        "trial_s_sum": round(tune_trial_seconds(report["experiment"]), 1),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")},
        "train_steps": sum(r.get("train_steps_total") or 0 for r in rows),
        "curve": best_so_far(rows), "best_val": best.get("val_ppl"), "best_test": best.get("test_ppl"),
        "best_val_rerun": best.get("val_ppl_rerun"),
        "best_params": {k[6:]: v for k, v in best.items() if k.startswith("param_")},
        "trials": [{"index": trial_index(r), **{k: r.get(k) for k in keep},
                    **{k[6:]: v for k, v in r.items() if k.startswith("param_")}} for r in rows],
        "cache": report.get("cache"),
    }
    print(json.dumps({k: result[k] for k in ("name", "wall_s", "statuses", "train_steps", "best_val", "best_test")}),
          flush=True)
    return result


def hand_recipe(name: str, overrides: dict, mode: str, fixed: dict) -> dict:
    """A recipe as a user runs it by hand: the space's fixed settings plus the recipe's knobs."""
    config = {**fixed, **HAND_BASE, **overrides, **(QUICK_HAND if mode == "quick" else {})}
    start = time.perf_counter()
    summary = run_trial(config).summary  # report_test on: ppl_final is the test perplexity
    row = {"variant": name + (" [quick]" if mode == "quick" else ""), "config": {k: config[k] for k in
           ("method", "prune_percentage", "epochs_per_iteration", "lr", "pruning_strategy")},
           "iterations": summary["iterations"], "val_ppl": summary["val"]["ppl_final"],
           "test_ppl": summary["ppl_final"], "test_ppl_dense": summary["ppl_dense"],
           "train_steps": summary["train_steps_total"], "wall_s": round(time.perf_counter() - start, 1)}
    return row


def hand_recipes(mode: str, space) -> list[dict]:
    """Both recipes at once as Ray tasks holding 1 CPU each, like two concurrent search trials."""
    run = ray.remote(num_cpus=1)(hand_recipe)
    rows = ray.get([run.remote(name, overrides, mode, space.fixed) for name, overrides in HAND.items()])
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def median_curve(curves: list[list[float | None]]) -> dict[str, list[float | None]]:
    """Median and min-max over seeds at each trial count (only where every seed has a value)."""
    out: dict[str, list[float | None]] = {"median": [], "min": [], "max": []}
    for values in zip(*curves):
        ok = None not in values
        out["median"].append(statistics.median(values) if ok else None)
        out["min"].append(min(values) if ok else None)
        out["max"].append(max(values) if ok else None)
    return out


def trials_to_reach(curve: list[float | None], value: float | None) -> int | None:
    """First trial count at which a best-so-far curve is at or below `value`."""
    return next((k + 1 for k, v in enumerate(curve) if v is not None and value is not None and v <= value), None)


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def gap_pct(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else round(100 * (value / reference - 1), 2)


def summarise(searches: list[dict], hand: list[dict], n: int) -> dict:
    """Aggregate over seeds and check the three targets of issue 11 item 5."""
    groups: dict[str, list[dict]] = {}
    for s in searches:
        mode = s.get("mode", "asha" if s["asha"] else "full")  # older records have only the flag
        groups.setdefault(f"{s['searcher']} ({MODE_LABELS[mode]})", []).append(s)
    agg = {}
    for label, runs in groups.items():
        agg[label] = {"curve": median_curve([r["curve"] for r in runs]), "seeds": [r["seed"] for r in runs],
                      "best_val_median": med([r["best_val"] for r in runs]),
                      "best_val_per_seed": [r["best_val"] for r in runs],
                      "best_test_median": med([r["best_test"] for r in runs]),
                      "best_test_per_seed": [r["best_test"] for r in runs],
                      "train_steps_median": med([r["train_steps"] for r in runs]),
                      "train_steps_sum": sum(r["train_steps"] for r in runs),
                      "wall_s_median": med([r["wall_s"] for r in runs])}
    random_final = agg.get("random (ASHA)", {}).get("best_val_median")
    for a in agg.values():
        a["trials_to_reach_random_final"] = trials_to_reach(a["curve"]["median"], random_final)
    targets = {}
    tpe, rnd = agg.get("optuna (ASHA)"), agg.get("random (ASHA)")
    if tpe and rnd and tpe["best_val_median"] is not None and random_final is not None:
        reach = tpe["trials_to_reach_random_final"]
        targets["a_tpe_beats_random"] = {
            "tpe_final_median": tpe["best_val_median"], "random_final_median": random_final,
            "tpe_trials_to_reach": reach, "limit_trials": 0.6 * n,
            "met": tpe["best_val_median"] <= random_final and reach is not None and reach <= 0.6 * n}
    full = agg.get("random (no early stopping)")
    if rnd and full:
        # Only seeds run both ways are compared: the same seed samples the same configurations,
        # so the pair differs only in early stopping (medians over unmatched seeds would not).
        full_by_seed = {f["seed"]: f for f in groups["random (no early stopping)"]}
        pairs = [(a, f) for a in groups["random (ASHA)"] if (f := full_by_seed.get(a["seed"]))
                 and a["best_val"] and f["best_val"]]
        if pairs:
            per_seed = [{"seed": a["seed"], "steps_ratio": round(a["train_steps"] / f["train_steps"], 3),
                         "best_gap_pct": gap_pct(a["best_val"], f["best_val"])} for a, f in pairs]
            compute = sum(a["train_steps"] for a, _ in pairs) / sum(f["train_steps"] for _, f in pairs)
            gap = statistics.median(a["best_val"] / f["best_val"] - 1 for a, f in pairs)
            targets["b_asha_compute"] = {"steps_ratio": round(compute, 3), "best_gap_pct": round(100 * gap, 2),
                                         "seeds": len(pairs), "per_seed": per_seed,
                                         "met": compute <= 0.5 and gap <= 0.02}
    hand_best = min((h["test_ppl"] for h in hand), default=None)
    if hand_best is not None:
        targets["c_test_vs_hand"] = {"hand_best_test": hand_best, "limit": 0.9 * hand_best, **{
            label: {"test_median": a["best_test_median"], "improvement_pct": None if a["best_test_median"] is None
                    else round(100 * (1 - a["best_test_median"] / hand_best), 1)} for label, a in agg.items()},
            "met": bool(tpe and tpe["best_test_median"] is not None and tpe["best_test_median"] <= 0.9 * hand_best)}
    return {"groups": agg, "targets": targets}


def plot(agg: dict, hand: list[dict], path: Path, title: str) -> None:
    """Median best-so-far validation ppl per searcher, shaded min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, a in agg.items():
        xs = [k + 1 for k, v in enumerate(a["curve"]["median"]) if v is not None]
        pick = [k - 1 for k in xs]
        line, = ax.step(xs, [a["curve"]["median"][k] for k in pick], where="post", marker=".",
                        label=label, linestyle="--" if "no early" in label else "-")
        ax.fill_between(xs, [a["curve"]["min"][k] for k in pick], [a["curve"]["max"][k] for k in pick],
                        step="post", alpha=0.15, color=line.get_color())
    for h in hand:
        ax.axhline(h["val_ppl"], color="gray", linestyle=":", linewidth=1)
        ax.annotate(h["variant"], (0.01, h["val_ppl"]), xycoords=("axes fraction", "data"), fontsize=7,
                    color="gray", va="bottom")
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trials started")
    ax.set_ylabel("best completed validation ppl so far")
    ax.set_title(f"{title}\nmedian (min-max) over search seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def asha_start(settings: dict) -> str:
    """Where ASHA's first rung was, in the run's fidelity."""
    if settings.get("fidelity") == "epochs":
        start = f"{settings['grace_epochs']} recovery epoch(s)"
    else:
        start = f"{settings.get('grace_sparsity_pct', 20)}% sparsity"
    return f"{start}, reduction factor {settings.get('reduction_factor', 2)}"


def to_markdown(result: dict, plot_name: str = "bench_search_curves.png") -> str:
    """The table and the targets, in the style of the other benchmark results."""
    s, agg, t = result["settings"], result["summary"]["groups"], result["summary"]["targets"]
    lines = [f"{s['num_samples']} trials per search, search seeds {s['seeds']}, max_concurrent "
             f"{s['max_concurrent']}, ASHA from {asha_start(s)}, {result['meta']['machine']}, {result['meta']['date']}; total wall "
             f"{result['wall_s'] / 60:.1f} min. val = validation ppl (what decides), test = the chosen "
             f"configuration's test ppl (never used to choose). Space: {s.get('space_file', 'search_spaces/default.yaml')}. "
             f"Plot: {plot_name}", "",
             "| variant | final best val (median [min-max]) | test of chosen (median) | trials to reach random's "
             "final median | train steps per search (median) | wall s per search (median) |",
             "|---|---|---|---|---|---|"]
    for label, a in agg.items():
        vals = [v for v in a["best_val_per_seed"] if v is not None]
        spread = f" [{min(vals):.2f}-{max(vals):.2f}]" if vals else ""
        lines.append(f"| {label} | {fmt(a['best_val_median'])}{spread} | {fmt(a['best_test_median'])} | "
                     f"{fmt(a['trials_to_reach_random_final'])} | {fmt(a['train_steps_median'], 0)} | "
                     f"{fmt(a['wall_s_median'], 0)} |")
    for h in result["hand"]:
        lines.append(f"| {h['variant']} | {fmt(h['val_ppl'])} | {fmt(h['test_ppl'])} | - | {h['train_steps']} | "
                     f"{h['wall_s']} |")
    lines += ["", "Targets:"]
    if "a_tpe_beats_random" in t:
        a = t["a_tpe_beats_random"]
        lines.append(f"- (a) TPE final median {fmt(a['tpe_final_median'])} vs random {fmt(a['random_final_median'])}, "
                     f"reached random's value after {fmt(a['tpe_trials_to_reach'])} trials (limit "
                     f"{a['limit_trials']:.1f}): **{'met' if a['met'] else 'not met'}**")
    if "b_asha_compute" in t:
        b = t["b_asha_compute"]
        lines.append(f"- (b) random with ASHA used {100 * b['steps_ratio']:.0f}% of the training steps of random "
                     f"without early stopping (same configurations, {b.get('seeds', '?')} seed(s) run both ways); "
                     f"its median best is {b['best_gap_pct']:+.2f}% off "
                     f"(limits 50%, +2%): **{'met' if b['met'] else 'not met'}**; per seed {b['per_seed']}")
    if "c_test_vs_hand" in t:
        c = t["c_test_vs_hand"]
        tpe = c.get("optuna (ASHA)", {})
        lines.append(f"- (c) TPE's chosen test ppl (median) {fmt(tpe.get('test_median'))} vs best hand recipe "
                     f"{fmt(c['hand_best_test'])}: {fmt(tpe.get('improvement_pct'), 1)}% better (needs >= 10%): "
                     f"**{'met' if c['met'] else 'not met'}**")
    cache = result.get("cache") or {}
    if cache:
        lines.append(f"\nShared statistics cache over all searches: {cache.get('hits')} hits, "
                     f"{cache.get('misses')} computed, {fmt(cache.get('saved_s'), 1)} s saved. Search wall / sum "
                     f"of trial times (median): {fmt(result['wall_over_trial_sum'], 3)}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 24: at 16 trials TPE has 11 model-based trials after its 5 random ones, too few to pass
    # random search's final value by 60% of the budget (search_surrogate.py: 12 of 16 needed).
    parser.add_argument("--num-samples", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--grace-sparsity-pct", type=int, default=SearchSettings.grace_sparsity_pct,
                        help="ASHA's first rung (asha_replay.py shows what each rung can tell on this space)")
    parser.add_argument("--fidelity", choices=("sparsity", "epochs"), default="sparsity",
                        help="what ASHA's rungs count (epochs: one-shot spaces, e.g. search_spaces/oneshot_recovery.yaml)")
    parser.add_argument("--grace-epochs", type=int, default=SearchSettings.grace_epochs,
                        help="ASHA's first rung with --fidelity epochs")
    parser.add_argument("--reduction-factor", type=int, default=SearchSettings.reduction_factor,
                        help="ASHA's reduction factor")
    parser.add_argument("--hand", choices=("full", "quick", "skip"), default="full",
                        help="hand recipes: full (p=0.1, 16 iterations x 3 epochs), quick (smoke runs) or skip")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE,
                        help="the space the searches run (the hand recipes use its fixed settings)")
    parser.add_argument("--hand-from", type=Path,
                        help="a bench_search.json whose hand recipes to reuse (its space's fixed settings must "
                             "be this space's: the recipes depend on nothing else)")
    parser.add_argument("--label", default="bench_search",
                        help="output file stem: LABEL.json, LABEL.md and LABEL_curves.png")
    parser.add_argument("--resume", type=Path, help="storage folder of a run cut short: keep what it finished")
    parser.add_argument("--no-new-runs", action="store_true", help="with --resume: only summarise what is there")
    parser.add_argument("--variants", default=",".join(f"{s}-{m}" for s, m in VARIANTS),
                        help="which searches to run (the summary covers every one run so far)")
    args = parser.parse_args()
    space = load_space(args.space)
    load_start = os.getloadavg()
    storage = args.resume or Path(tempfile.mkdtemp(prefix="raysparse-bench-search-"))
    print(f"storage: {storage}", flush=True)
    hand_file, searches_file = storage / "bench_hand.json", storage / "bench_searches.json"
    hand = json.loads(hand_file.read_text()) if hand_file.is_file() else None
    if hand is None and args.hand_from:
        previous = json.loads(args.hand_from.read_text())
        if previous["settings"]["space"]["fixed"] != space.to_dict()["fixed"]:
            raise SystemExit(f"--hand-from {args.hand_from}: its space fixes other settings than {args.space}")
        hand = previous["hand"]
    searches = json.loads(searches_file.read_text()) if searches_file.is_file() else []
    done = {s["name"] for s in searches}
    # Variant by variant in the order of VARIANTS (TPE, random, random without ASHA, Sobol, TPE
    # without ASHA, TPE ignoring stopped trials): a run cut short (on a loaded 2-core machine a
    # search takes 5-15 min) still holds the comparisons the targets are about for every seed,
    # and --resume finishes the rest.
    wanted = set(args.variants.split(","))
    plan = [(searcher, seed, mode) for searcher, mode in VARIANTS for seed in range(args.seeds)
            if f"{searcher}-{mode}" in wanted and f"{searcher}-seed{seed}-{mode}" not in done]
    if not args.no_new_runs and (plan or hand is None):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        if hand is None:
            hand = hand_recipes(args.hand, space) if args.hand != "skip" else []
            hand_file.write_text(json.dumps(hand))
        for searcher, seed, mode in plan:
            searches.append(one_search(args, storage, searcher, seed, mode))
            searches_file.write_text(json.dumps(searches, default=str))  # survives a crash below
        ray.shutdown()
    hand = hand or []
    import optuna
    import torch

    result = {
        "settings": {"num_samples": args.num_samples, "grace_sparsity_pct": args.grace_sparsity_pct,
                     "fidelity": args.fidelity, "grace_epochs": args.grace_epochs,
                     "reduction_factor": args.reduction_factor,
                     "seeds": sorted({s["seed"] for s in searches}), "max_concurrent": args.max_concurrent, "hand": args.hand, "space": space.to_dict(),
                     "space_file": str(args.space),
                     "hand_recipes": {k: {**HAND_BASE, **v} for k, v in HAND.items()}},
        "meta": {"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (shared), " + platform.machine(),
                 "loadavg_1_5_15min_start": load_start, "loadavg_1_5_15min_end": os.getloadavg(),
                 "command": " ".join(sys.argv), "torch": torch.__version__, "ray": ray.__version__,
                 "optuna": optuna.__version__},
        "summary": summarise(searches, hand, args.num_samples), "hand": hand, "searches": searches,
        "cache": searches[-1]["cache"] if searches else None,  # the coordinator's counts are cumulative
        "wall_over_trial_sum": med([s["wall_s"] / s["trial_s_sum"] for s in searches if s["trial_s_sum"]]),
        "storage": str(storage),
        # Searches one after another, plus the two hand recipes (which run side by side): also right
        # for a run continued with --resume, whose own process saw only part of it.
        "wall_s": round(sum(s["wall_s"] for s in searches) + max((h["wall_s"] for h in hand), default=0.0), 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result["summary"]["groups"], hand, args.out / f"{args.label}_curves.png",
         space.description or "tiny, iterative to 80% + masked recovery")
    (args.out / f"{args.label}.json").write_text(json.dumps(result, indent=2, default=str))
    markdown = to_markdown(result, f"{args.label}_curves.png")
    (args.out / f"{args.label}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
