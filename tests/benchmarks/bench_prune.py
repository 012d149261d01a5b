"""Benchmark the one-shot pruners: perplexity, prune time, peak memory, and cost ratios.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_prune.py [--models tiny,stories260K] [--nsamples 128]

For each model and each method at 50% and 2:4 it records perplexity after pruning, the
prune time, and, measured in the same process, the ratio of prune time to one plain
forward pass over the same calibration windows (targets: Wanda <= 2x, SparseGPT <= 10x).
Memory is the peak extra resident memory (CPU) or CUDA allocation (GPU) during pruning,
compared with the bound "one layer's calibration activations x 4" on top of the model.
Writes results/bench_prune.json and results/bench_prune.md next to this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from raysparse.config import PruneConfig
from raysparse.data.sources import calibration_windows, resolve_source, token_stream
from raysparse.metrics.perplexity import perplexity
from raysparse.models.loading import load_model, resolve_device
from raysparse.prune import prune

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"
TARGET_RATIO = {"magnitude": None, "wanda": 2.0, "sparsegpt": 10.0}


class RssPeak:
    """Samples this process's resident memory in a thread; CPU has no allocator peak counter."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self.start = self.current()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def model_cases(names: list[str]) -> list[dict]:
    cases = []
    for name in names:
        if name == "tiny":
            cases.append({"name": "tiny", "model": "tiny", "calib": "pydoc", "eval": "pydoc", "seqlen": None})
        elif name == "stories260K":
            model_dir = SHARED / "stories260K" / "hf"
            text_file = SHARED / "tinystories_valid" / "tinystories_val.txt"
            if not model_dir.exists():
                print(f"skipping stories260K: {model_dir} absent")
                continue
            text = text_file.read_text(encoding="utf-8")
            split = Path(tempfile.mkdtemp(prefix="raysparse-bench-"))
            (split / "calib.txt").write_text(text[: len(text) // 4], encoding="utf-8")
            (split / "eval.txt").write_text(text[len(text) // 4:], encoding="utf-8")
            cases.append({"name": "stories260K", "model": str(model_dir), "calib": str(split / "calib.txt"),
                          "eval": str(split / "eval.txt"), "seqlen": 512})
        else:
            cases.append({"name": name, "model": name, "calib": "c4", "eval": "wikitext2", "seqlen": None})
    return cases


def time_forward(model, calib: torch.Tensor, batch_size: int, device: torch.device) -> float:
    with torch.no_grad():
        model(input_ids=calib[:batch_size].to(device), use_cache=False)  # warm-up
        start = time.perf_counter()
        for i in range(0, calib.shape[0], batch_size):
            model(input_ids=calib[i : i + batch_size].to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(case: dict, method: str, sparsity: str, nsamples: int, eval_windows: int) -> dict:
    config = PruneConfig(model=case["model"], method=method, sparsity=sparsity, nsamples=nsamples,
                         seqlen=case["seqlen"], eval_seqlen=case["seqlen"], calib_data=case["calib"],
                         eval_data=case["eval"]).validate()
    device = resolve_device(config.device)
    loaded = load_model(config.model, config.device, config.dtype)
    loaded.model.to(device)
    seqlen = config.seqlen or min(loaded.adapter.context_length(), 2048)
    calib = calibration_windows(token_stream(loaded.tokenizer, resolve_source(case["calib"], "calibration")),
                                nsamples, seqlen, config.seed)
    eval_stream = token_stream(loaded.tokenizer, resolve_source(case["eval"], "test"))
    forward_s = time_forward(loaded.model, calib, config.calib_batch_size, device)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    hidden = loaded.model.config.hidden_size if hasattr(loaded.model.config, "hidden_size") else loaded.model.config.n_embd
    layer_activation_bytes = nsamples * seqlen * hidden * 4
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        prune(loaded.adapter, config, calib, device)
        torch.cuda.synchronize()
        prune_s = time.perf_counter() - start
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        with RssPeak() as rss:
            start = time.perf_counter()
            prune(loaded.adapter, config, calib, device)
            prune_s = time.perf_counter() - start
        peak_bytes = model_bytes + (rss.peak - rss.start)  # model is resident before pruning starts
    ppl = perplexity(loaded.model, eval_stream, seqlen, max_windows=eval_windows, progress=False).ppl
    bound = model_bytes + 4 * layer_activation_bytes
    return {
        "model": case["name"], "method": method, "sparsity": sparsity, "ppl": round(ppl, 4),
        "prune_s": round(prune_s, 3), "forward_s": round(forward_s, 4),
        "prune_over_forward": round(prune_s / forward_s, 2), "target_ratio": TARGET_RATIO[method],
        "peak_mb": round(peak_bytes / 2**20, 1), "memory_bound_mb": round(bound / 2**20, 1),
        "memory_ok": peak_bytes <= bound, "nsamples": nsamples, "seqlen": seqlen, "device": str(device),
    }


def dense_ppl(case: dict, eval_windows: int) -> float:
    loaded = load_model(case["model"])
    seqlen = case["seqlen"] or min(loaded.adapter.context_length(), 2048)
    stream = token_stream(loaded.tokenizer, resolve_source(case["eval"], "test"))
    return round(perplexity(loaded.model, stream, seqlen, max_windows=eval_windows, progress=False).ppl, 4)


def to_markdown(rows: list[dict], dense: dict[str, float]) -> str:
    lines = ["| model | method | sparsity | ppl (dense) | prune s | prune / forward (target) | peak MB (bound) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = f"<= {r['target_ratio']:g}x" if r["target_ratio"] else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['sparsity']} | {r['ppl']:.3f} ({dense[r['model']]:.3f}) | "
                     f"{r['prune_s']:.2f} | {r['prune_over_forward']:.1f}x ({target}) | "
                     f"{r['peak_mb']:.0f} ({r['memory_bound_mb']:.0f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,stories260K")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()
    rows, dense = [], {}
    for case in model_cases(args.models.split(",")):
        dense[case["name"]] = dense_ppl(case, args.eval_windows)
        for method in ("magnitude", "wanda", "sparsegpt"):
            for sparsity in ("0.5", "2:4"):
                row = run_case(case, method, sparsity, args.nsamples, args.eval_windows)
                print(json.dumps(row))
                rows.append(row)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    (out / "bench_prune.json").write_text(json.dumps({"meta": meta, "dense_ppl": dense, "rows": rows}, indent=2))
    (out / "bench_prune.md").write_text(to_markdown(rows, dense) + "\n")
    print(to_markdown(rows, dense))


if __name__ == "__main__":
    main()
