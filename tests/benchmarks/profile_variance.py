"""How much of a profile's measured gain is calibration noise? Re-prune fixed profiles with several seeds.

Run after bench_profile.py (reads the profiles its row recorded):

    python tests/benchmarks/profile_variance.py [--results FILE] [--model smollm2] [--method sparsegpt]
        [--target 0.8] [--database anchored] [--seeds 0,1,2] [--eval-windows 32] [--label NAME]

bench_profile measures each profile once: one calibration draw, 8 validation and 8 test
windows. At high sparsity SparseGPT turns float-level differences into different masks, so
one draw can flatter a profile. This prunes the recorded best heuristic (importance, OWL:
whichever tested best) and the searched profile with the *same* ratios but other calibration
seeds (the seed draws the calibration windows), evaluates each on more windows, and reports
mean and spread: a gain smaller than the spread is not one. Validation and test both
reported; nothing here feeds a decision. Writes results/LABEL.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_profile import HERE, HEURISTIC_BOUNDS, heuristic_trial, model_config, trial

from raysparse.config.layer_ratios import write_layer_ratios
from raysparse.models.fingerprint import model_fingerprint


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 3), "std": round(statistics.stdev(values), 3) if len(values) > 1
            else 0.0, "values": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results" / "bench_profile.json"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--database", default="anchored")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (bench_profile's default: 16 at 135M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="profile_variance")
    parser.add_argument("--also", default="",
                        help="more heuristics to re-prune beside the row's best, e.g. importance:1,owl:0.5 (their "
                             "ratios from calibration seed 0, as the row's); the gain is reported against each")
    parser.add_argument("--importance-samples", type=int, default=8, help="for --also (bench_profile's default at 135M)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = json.loads(Path(args.results).read_text())["rows"]
    row = next((r for r in rows if r["model"] == args.model and r["method"] == args.method
                and float(r["target"]) == args.target and r.get("database", "dense") == args.database), None)
    if row is None:
        sys.exit(f"no {args.model} {args.method} {args.target} ({args.database}) row in {args.results}")
    heuristic = min(("uniform", "importance", "owl"), key=lambda k: row[k]["test_ppl"])
    profiles = {f"{heuristic} (best heuristic)": row[heuristic]["ratios"]}
    started = time.perf_counter()
    out: dict = {"args": vars(args), "row": {"heuristic": heuristic, "recorded_test": {
        f"{heuristic} (best heuristic)": row[heuristic]["test_ppl"], "searched": row["searched"]["test_ppl"]}},
                 "profiles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = {**model_config(args.model, Path(tmp), args.eval_windows), "method": args.method,
                "sparsity": str(args.target), "nsamples": args.nsamples}
        fingerprint = model_fingerprint(base["model"])
        for item in filter(None, args.also.split(",")):
            kind, alpha = item.split(":")
            ratios = heuristic_trial({**base, "importance_samples": args.importance_samples, **HEURISTIC_BOUNDS},
                                     kind, float(alpha), seed=0, report_test=False)["ratios"]
            profiles[f"{kind} a={float(alpha):g}"] = ratios
        profiles["searched"] = row["searched"]["ratios"]
        for name, ratios in profiles.items():
            extra = {}
            if ratios is not None:  # None: the uniform heuristic (no per-layer ratios recorded)
                extra["layer_ratios"] = str(write_layer_ratios(Path(tmp) / f"{name.split(' ')[0]}.json", ratios,
                                                               base["model"], fingerprint, args.target))
            runs = [trial(base, seed=int(seed), **extra) for seed in args.seeds.split(",")]
            out["profiles"][name] = {"val": spread([r["val_ppl"] for r in runs]),
                                     "test": spread([r["test_ppl"] for r in runs])}
            print(name, out["profiles"][name], flush=True)
    names = list(profiles)
    searched = out["profiles"]["searched"]["test"]["mean"]
    out["gain_test_mean_vs"] = {n: round(1 - searched / out["profiles"][n]["test"]["mean"], 4) for n in names[:-1]}
    out["gain_test_mean"] = min(out["gain_test_mean_vs"].values())  # against the strongest heuristic measured
    out["wall_s"] = round(time.perf_counter() - started, 1)
    results = HERE / "results"
    (results / f"{args.label}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# {args.label}: {args.model} {args.method} {args.target} ({args.database} row of {Path(args.results).name})",
             "", f"Machine: {platform.machine()}; command: `python tests/benchmarks/profile_variance.py "
             f"{' '.join(sys.argv[1:])}`; {out['wall_s']} s", "",
             f"Same ratios, calibration seeds {args.seeds}, {args.eval_windows} validation and test windows "
             "(bench_profile: seed 0, its --eval-windows).", "",
             "| profile | recorded test (bench_profile row: seed 0) | val mean ± std | test mean ± std | test per seed |",
             "|---|---|---|---|---|"]
    for name in names:
        p = out["profiles"][name]
        recorded = out["row"]["recorded_test"].get(name)
        lines.append(f"| {name} | {'-' if recorded is None else format(recorded, '.2f')} | {p['val']['mean']:.2f} ± {p['val']['std']:.2f} | "
                     f"{p['test']['mean']:.2f} ± {p['test']['std']:.2f} | {', '.join(f'{v:.2f}' for v in p['test']['values'])} |")
    lines += [""] + [f"Searched vs {n}, mean test: {100 * g:+.1f}%" for n, g in out["gain_test_mean_vs"].items()]
    (results / f"{args.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
