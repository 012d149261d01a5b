"""Benchmark zero-shot accuracy (lm-eval, the shipped offline last-word tasks) beside perplexity.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_zeroshot.py [--models tiny,stories260K] [--targets 0.5,0.8] [--limit 100]

For each model (the `tiny` preset on the pydoc task, stories260K on the TinyStories task),
pruning method (magnitude, Wanda, SparseGPT), target and recovery (none, or a short masked
recovery), one `run_trial` in this process: test perplexity and test-split accuracy of the
dense and the final model, and the validation-split accuracy a search would decide on. The
dense numbers come once per model through a statistics cache shared by the rows. Then the
cost: one zero-shot evaluation (the --limit documents of the test split) timed against one
perplexity evaluation of the same dense model (the rows' test windows), as a ratio.
Writes results/bench_zeroshot.json and .md beside this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from raysparse.config import TrialConfig
from raysparse.metrics.zeroshot import TaskSpec, evaluate_tasks
from raysparse.trial.context import _prepare
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"
METHODS = ("magnitude", "wanda", "sparsegpt")
RECOVERY = dict(recovery="masked", lr=1e-3, batch_size=8, train_samples=64, max_steps=8)
EVAL = dict(eval_max_windows=20)


def model_case(name: str, folder: Path) -> dict | None:
    if name == "tiny":
        return {"name": "tiny", "model": "tiny", "eval_tasks": "raysparse_lastword_pydoc"}
    model_dir = SHARED / "stories260K" / "hf"
    text_file = SHARED / "tinystories_valid" / "tinystories_val.txt"
    if not (model_dir.is_dir() and text_file.is_file()):
        print(f"skipping {name}: {model_dir} or {text_file} is absent", file=sys.stderr)
        return None
    # The splits the shipped TinyStories task uses: calibration from the first half, validation
    # the third quarter, test the fourth.
    text = text_file.read_text(encoding="utf-8")
    quarter = len(text) // 4
    for part, piece in (("train", text[: 2 * quarter]), ("val", text[2 * quarter: 3 * quarter]),
                        ("test", text[3 * quarter:])):
        (folder / f"{part}.txt").write_text(piece, encoding="utf-8")
    return {"name": name, "model": str(model_dir), "eval_tasks": "raysparse_lastword_tinystories",
            "calib_data": str(folder / "train.txt"), "val_data": str(folder / "val.txt"),
            "eval_data": str(folder / "test.txt"), "seqlen": 256, "eval_seqlen": 256}


def run_row(case: dict, method: str, target: float, recovered: bool, limit: int, cache: str) -> dict:
    settings = {k: v for k, v in case.items() if k != "name"}
    config = TrialConfig(**settings, **EVAL, method=method, sparsity=str(target), nsamples=32,
                         eval_tasks_limit=limit, stats_cache=cache, **(RECOVERY if recovered else {}))
    started = time.perf_counter()
    summary = run_trial(config).summary
    zeroshot = summary["zeroshot"]
    return {"model": case["name"], "method": method, "target": target, "recovery": "masked" if recovered else "none",
            "ppl_dense": summary["ppl_dense"], "ppl_final": summary["ppl_final"],
            "acc_dense": zeroshot["acc_dense"], "acc_final": zeroshot["acc_final"],
            "val_acc_dense": zeroshot["val"]["acc_dense"], "val_acc_final": zeroshot["val"]["acc_final"],
            "acc_final_stderr": next(iter(zeroshot["test_final"]["tasks"].values())).get("acc_stderr"),
            "documents": next(iter(zeroshot["test_final"]["tasks"].values()))["documents"],
            "wall_s": round(time.perf_counter() - started, 2)}


def eval_cost(case: dict, limit: int) -> dict:
    """One zero-shot evaluation against one perplexity evaluation of the dense model, same process."""
    settings = {k: v for k, v in case.items() if k != "name"}
    ctx = _prepare(TrialConfig(**settings, **EVAL, method="magnitude", eval_tasks_limit=limit).validate())
    ctx.evaluate_test()  # warm-up
    started = time.perf_counter()
    ctx.evaluate_test()
    ppl_s = time.perf_counter() - started
    spec: TaskSpec = ctx.tasks
    evaluate_tasks(ctx.loaded.model, ctx.loaded.tokenizer, spec, "test", ctx.device)  # warm-up (dataset files)
    started = time.perf_counter()
    evaluate_tasks(ctx.loaded.model, ctx.loaded.tokenizer, spec, "test", ctx.device)
    zs_s = time.perf_counter() - started
    return {"model": case["name"], "ppl_eval_s": round(ppl_s, 3), "zeroshot_eval_s": round(zs_s, 3),
            "ratio": round(zs_s / ppl_s, 2), "ppl_windows": EVAL["eval_max_windows"], "documents": limit}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def to_markdown(rows: list[dict], costs: list[dict], meta: dict) -> str:
    lines = [f"# bench_zeroshot ({meta['date']}, {meta['machine']}, lm-eval {meta['lm_eval']}, "
             f"{meta['limit']} documents per split)", "",
             "Accuracy in % on the shipped last-word tasks (test split; validation split in brackets: what a "
             "search decides on); perplexity on the test text.", "",
             "| model | method | target | recovery | test ppl | acc (val acc) | ± stderr | dense ppl | dense acc (val) "
             "| trial s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['target']:.0%} | {r['recovery']} | {r['ppl_final']:.2f} | "
                     f"{_pct(r['acc_final'])} ({_pct(r['val_acc_final'])}) | {_pct(r['acc_final_stderr'])} | "
                     f"{r['ppl_dense']:.2f} | {_pct(r['acc_dense'])} ({_pct(r['val_acc_dense'])}) | {r['wall_s']} |")
    lines += ["", "| model | one perplexity evaluation s (windows) | one zero-shot evaluation s (documents) | ratio |",
              "|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['model']} | {c['ppl_eval_s']} ({c['ppl_windows']}) | {c['zeroshot_eval_s']} "
                     f"({c['documents']}) | {c['ratio']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import lm_eval

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,stories260K")
    parser.add_argument("--targets", default="0.5,0.8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--limit", type=int, default=100, help="documents per split")
    parser.add_argument("--no-recovery", action="store_true", help="skip the recovered rows")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="raysparse-bench-zs-"))
    rows, costs = [], []
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "lm_eval": lm_eval.__version__, "limit": args.limit, "recovery": RECOVERY, "eval": EVAL}
    for name in args.models.split(","):
        case = model_case(name, folder)
        if case is None:
            continue
        cache = str(folder / f"cache-{name}")
        costs.append(eval_cost(case, args.limit))
        print(json.dumps(costs[-1]), flush=True)
        # Without recovery first: a run cut short still has every method at every target.
        for recovered in (False,) if args.no_recovery else (False, True):
            for target in (float(t) for t in args.targets.split(",")):
                for method in args.methods.split(","):
                    rows.append(run_row(case, method, target, recovered, args.limit, cache))
                    print(json.dumps(rows[-1]), flush=True)
                    write(args.out, rows, costs, meta)  # after every row: a long run leaves what it measured
    print(to_markdown(rows, costs, meta))


def write(out: Path, rows: list[dict], costs: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_zeroshot.json").write_text(json.dumps({"meta": meta, "rows": rows, "costs": costs}, indent=2))
    (out / "bench_zeroshot.md").write_text(to_markdown(rows, costs, meta))


if __name__ == "__main__":
    main()
