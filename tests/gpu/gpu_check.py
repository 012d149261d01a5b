"""The GPU check: every CUDA path of raysparse on a real 135M model, in one short run.

    bash tests/gpu/run.sh                 # on a CUDA machine: SmolLM2-135M GGUF, JSON to $OUT
    bash tests/gpu/run.sh --dry-run       # on CPU: the same code paths at tiny sizes

Why a script and not tests: the project's tests run on CPU (CI has no GPU), so bf16
pruning, CUDA layer-by-layer pruning, NCCL FSDP and the 2:4 sparse kernels would otherwise
never run before a user's first GPU search. Whoever gets a GPU machine runs this once (it
stays well under 10 minutes on one GPU) and records the JSON in the README.

Checks (each timed; a failing check is recorded and the others still run):

- `gguf_load`: the GGUF file dequantised and saved as safetensors (the other checks load
  that folder, so the slow GGUF parse is paid once);
- `bf16_trial`: one-shot Wanda 50% and SparseGPT 2:4 through `run_trial` in bfloat16 on the
  device, sparsity exact and perplexity (dense, pruned) finite;
- `layerwise_cost`: Wanda and SparseGPT time as a multiple of one forward pass over the same
  calibration windows (same process; the issue's targets at 135M: <= 1.2x and <= 2.5x);
- `fsdp_recovery`: masked recovery on ONE Ray Train worker through raysparse's own
  distributed driver (FSDP2; NCCL on GPU, gloo on CPU), masks verified afterwards;
- `structured_latency`: structured pruning (25%) through `run_trial`, with its decode and
  prefill latency before and after;
- `semi_structured_24`: for 2:4 masks (the project's own N:M selection) on the model's MLP
  shapes and a 7B-sized one, `F.linear` with `torch.sparse.to_sparse_semi_structured`
  weights vs dense (CUDA sm80+ only; the dry run times the dense side and says so);
- `offload`: SparseGPT 50% through `run_trial` with `--offload none|cpu|disk` (one decoder
  layer at a time on the device): the same perplexity and sparsity, and each one's peak
  device memory.

The dry run uses the given `--model` (default: the `tiny` preset) and tiny sizes; every
part that needs CUDA is listed under `skipped` in the JSON, never silently left out.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: real_models
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # bench_prune.time_forward

from bench_prune import time_forward  # noqa: E402
from real_models import SMOLLM2_INSTALL, smollm2_gguf_path  # noqa: E402

from raysparse.config import PruneConfig  # noqa: E402
from raysparse.data.sources import calibration_windows, resolve_source, token_stream  # noqa: E402
from raysparse.models.loading import LoadedModel, load_config, load_model, resolve_model_path  # noqa: E402
from raysparse.prune import prune  # noqa: E402
from raysparse.prune.selection import nm_mask  # noqa: E402
from raysparse.recover.distributed.driver import EvalSpec, train_masked_distributed  # noqa: E402
from raysparse.recover.loop import TrainSettings  # noqa: E402
from raysparse.sparsity.masks import verify_masks  # noqa: E402
from raysparse.trial.runner import run_trial  # noqa: E402

logger = logging.getLogger("gpu_check")

TARGETS = {"wanda": 1.2, "sparsegpt": 2.5}  # prune time / one calibration forward, at 135M (issue 13)


@dataclass(frozen=True)
class Sizes:
    nsamples: int
    seqlen: int
    eval_windows: int
    batch: int
    train_steps: int
    prompt_tokens: int
    new_tokens: int
    matmul_tokens: int
    matmul_shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) beyond the model's own


GPU_SIZES = Sizes(nsamples=64, seqlen=512, eval_windows=32, batch=8, train_steps=20, prompt_tokens=128,
                  new_tokens=32, matmul_tokens=4096, matmul_shapes=((11008, 4096), (4096, 11008)))
DRY_SIZES = Sizes(nsamples=4, seqlen=32, eval_windows=2, batch=2, train_steps=2, prompt_tokens=8,
                  new_tokens=4, matmul_tokens=64, matmul_shapes=((128, 64),))


@dataclass
class Run:
    """What every check shares: where the model and texts are, the device, sizes, what was skipped."""

    model: str
    calib: str
    val: str
    test: str
    device: torch.device
    sizes: Sizes
    workdir: Path
    skipped: list[str]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.cuda else "float32"

    def trial_values(self, **overrides: Any) -> dict[str, Any]:
        s = self.sizes
        values = dict(model=self.model, device=str(self.device), calib_data=self.calib, val_data=self.val,
                      eval_data=self.test, nsamples=s.nsamples, seqlen=s.seqlen, eval_seqlen=s.seqlen,
                      eval_max_windows=s.eval_windows, calib_batch_size=s.batch, dtype=self.dtype)
        values.update(overrides)
        return values

    def load(self) -> LoadedModel:
        loaded = load_model(self.model, str(self.device), self.dtype)
        loaded.model.to(self.device)
        return loaded

    def calibration(self, loaded: LoadedModel, nsamples: int, seed: int = 0) -> torch.Tensor:
        stream = token_stream(loaded.tokenizer, resolve_source(self.calib, "calibration"))
        return calibration_windows(stream, nsamples, self.sizes.seqlen, seed)


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_gguf_load(run: Run) -> dict[str, Any]:
    """Dequantise the GGUF once and save it; later checks load the safetensors folder."""
    if not run.model.lower().endswith(".gguf"):
        return {"status": "skipped", "reason": f"--model {run.model} is not a GGUF file"}
    start = time.perf_counter()
    loaded = load_model(run.model, "cpu", "float32")
    load_s = time.perf_counter() - start
    folder = run.workdir / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    cfg = loaded.model.config
    run.model = str(folder)
    return {"load_s": round(load_s, 2), "params": sum(p.numel() for p in loaded.model.parameters()),
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "vocab": cfg.vocab_size, "saved_to": str(folder)}


def check_bf16_trial(run: Run) -> dict[str, Any]:
    """One-shot pruning and evaluation through run_trial, in bf16 on the GPU."""
    if not run.cuda:
        run.skipped.append("bf16_trial: CUDA kernels (the dry run prunes and evaluates in bfloat16 on CPU)")
    rows = {}
    for method, sparsity in (("wanda", "0.5"), ("sparsegpt", "2:4")):
        summary = run_trial(run.trial_values(method=method, sparsity=sparsity, dtype="bfloat16")).summary
        ok = abs(summary["sparsity_measured"] - 0.5) < 1e-9 and _finite(summary["ppl_dense"], summary["ppl_pruned"])
        if not ok:
            raise AssertionError(f"{method} {sparsity}: sparsity {summary['sparsity_measured']}, "
                                 f"ppl {summary['ppl_dense']} -> {summary['ppl_pruned']}")
        rows[f"{method} {sparsity}"] = {
            "ppl_dense": summary["ppl_dense"], "ppl_pruned": summary["ppl_pruned"],
            "sparsity_measured": summary["sparsity_measured"], "timings_s": summary["timings_s"],
            "peak_memory_mb": summary.get("peak_memory_mb"), "dtype": summary["protocol"].get("dtype")}
    return rows


def check_layerwise_cost(run: Run) -> dict[str, Any]:
    """Prune time as a multiple of one forward over the same calibration windows (same process)."""
    loaded = run.load()
    calib = run.calibration(loaded, run.sizes.nsamples)
    dense = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    forward_s = time_forward(loaded.model, calib, run.sizes.batch, run.device)
    rows: dict[str, Any] = {"forward_s": round(forward_s, 4), "nsamples": run.sizes.nsamples,
                            "seqlen": run.sizes.seqlen, "dtype": run.dtype}
    for method in ("wanda", "sparsegpt"):
        loaded.model.load_state_dict(dense)
        config = PruneConfig(model=run.model, method=method, sparsity="0.5", nsamples=run.sizes.nsamples,
                             seqlen=run.sizes.seqlen, calib_batch_size=run.sizes.batch)
        if run.cuda:
            torch.cuda.synchronize(run.device)
        start = time.perf_counter()
        prune(loaded.adapter, config, calib, run.device)
        if run.cuda:
            torch.cuda.synchronize(run.device)
        prune_s = time.perf_counter() - start
        ratio = prune_s / forward_s
        rows[method] = {"prune_s": round(prune_s, 3), "over_forward": round(ratio, 2), "target": TARGETS[method],
                        "meets_target": ratio <= TARGETS[method]}
    return rows


def check_fsdp_recovery(run: Run) -> dict[str, Any]:
    """Masked recovery on one Ray Train worker via raysparse's distributed driver (NCCL on GPU)."""
    if not run.cuda:
        run.skipped.append("fsdp_recovery: NCCL (the dry run trains on one gloo worker on CPU)")
    loaded = run.load()
    masks = prune(loaded.adapter, PruneConfig(model=run.model, method="wanda", sparsity="0.5",
                                              nsamples=run.sizes.nsamples, seqlen=run.sizes.seqlen),
                  run.calibration(loaded, run.sizes.nsamples), run.device)
    windows = run.calibration(loaded, run.sizes.batch * run.sizes.train_steps, seed=1)
    val_stream = token_stream(loaded.tokenizer, resolve_source(run.val, "validation"))
    settings = TrainSettings(lr=1e-5, epochs=1, batch_size=run.sizes.batch, max_steps_per_epoch=run.sizes.train_steps,
                             bf16=run.cuda, keep_best=False)
    import ray

    start = time.perf_counter()
    # Our own local instance: the driver, finding none, would join any `ray start` cluster on the machine.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), num_gpus=1 if run.cuda else 0,
             include_dashboard=False, log_to_driver=False)
    try:
        result = train_masked_distributed(
            loaded.model, masks, windows, settings,
            EvalSpec(val_stream, run.sizes.seqlen, None, run.sizes.batch, run.sizes.eval_windows),
            workers=1, storage_path=str(run.workdir / "ray_train"), run_name="gpu-check-fsdp", use_gpu=run.cuda)
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - start
    verify_masks(loaded.model, masks)
    if not _finite(result.final_ppl):
        raise AssertionError(f"perplexity after recovery is {result.final_ppl}")
    return {"backend": "nccl" if run.cuda else "gloo", "workers": 1, "wall_s": round(wall_s, 2),
            "steps": result.steps, "baseline_ppl": result.baseline_ppl, "final_ppl": result.final_ppl,
            "train_loss": result.train_loss, "epoch_s": [round(r.time_s, 2) for r in result.epochs]}


def check_structured_latency(run: Run) -> dict[str, Any]:
    """Structured pruning (25% of kv groups and MLP channels) and the latency it buys."""
    s = run.sizes
    summary = run_trial(run.trial_values(method="structured", pruning_ratio=0.25, num_examples=max(2, s.batch),
                                         max_seq_len=s.seqlen, importance_samples=s.nsamples)).summary
    st = summary["structured"]
    if not _finite(summary["ppl_dense"], summary["ppl_pruned"]):
        raise AssertionError(f"structured ppl {summary['ppl_dense']} -> {summary['ppl_pruned']}")
    return {"ppl_dense": summary["ppl_dense"], "ppl_pruned": summary["ppl_pruned"],
            "params_before": st["params_before"], "params_after": st["params_after"],
            "decode_speedup": st["decode_speedup"], "prefill_speedup": st["prefill_speedup"],
            "latency_before": st["latency_before"], "latency_after": st["latency_after"]}


def _median_ms(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def check_semi_structured_24(run: Run) -> dict[str, Any]:
    """2:4 weights through torch's semi-structured sparse kernels vs the same dense matmul."""
    cfg = load_config(resolve_model_path(run.model))
    shapes = list(run.sizes.matmul_shapes)
    if hasattr(cfg, "intermediate_size"):
        shapes = [(cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)] + shapes
    sparse_ok = run.cuda and torch.cuda.get_device_capability(run.device) >= (8, 0)
    if not sparse_ok:
        run.skipped.append("semi_structured_24: to_sparse_semi_structured needs CUDA sm80+ (dense side timed only)")
    dtype = torch.float16 if run.cuda else torch.float32
    generator = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in shapes:
        weight = torch.randn(out_f, in_f, generator=generator).to(run.device, dtype)
        weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4).to(run.device), 0)
        x = torch.randn(run.sizes.matmul_tokens, in_f, generator=generator).to(run.device, dtype)
        row = {"shape": [out_f, in_f], "tokens": run.sizes.matmul_tokens, "dtype": str(dtype).replace("torch.", ""),
               "zeros": round(float((weight == 0).float().mean()), 4),
               "dense_ms": round(_median_ms(lambda: torch.nn.functional.linear(x, weight), run.device), 4)}
        if sparse_ok:
            from torch.sparse import to_sparse_semi_structured

            sparse = to_sparse_semi_structured(weight)
            row["sparse_ms"] = round(_median_ms(lambda: torch.nn.functional.linear(x, sparse), run.device), 4)
            row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
            diff = (torch.nn.functional.linear(x, sparse) - torch.nn.functional.linear(x, weight)).abs().max()
            row["max_abs_diff"] = float(diff)
        rows.append(row)
    return {"rows": rows}


def check_offload(run: Run) -> dict[str, Any]:
    """--offload cpu|disk: one decoder layer at a time on the device, the same result as the
    model held whole on it, and the device's peak memory of each."""
    rows: dict[str, Any] = {}
    for offload in ("none", "cpu", "disk"):
        if run.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(run.device)
        summary = run_trial(run.trial_values(method="sparsegpt", sparsity="0.5", offload=offload)).summary
        rows[offload] = {"ppl_dense": summary["ppl_dense"], "ppl_pruned": summary["ppl_pruned"],
                         "sparsity_measured": summary["sparsity_measured"], "timings_s": summary["timings_s"],
                         "device_peak_mb": round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)
                         if run.cuda else None}
    for offload in ("cpu", "disk"):
        if (rows[offload]["ppl_pruned"], rows[offload]["sparsity_measured"]) != (
                rows["none"]["ppl_pruned"], rows["none"]["sparsity_measured"]):
            raise AssertionError(f"--offload {offload} differs from none: {rows[offload]} vs {rows['none']}")
    return rows


CHECKS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "gguf_load": check_gguf_load,
    "bf16_trial": check_bf16_trial,
    "layerwise_cost": check_layerwise_cost,
    "fsdp_recovery": check_fsdp_recovery,
    "structured_latency": check_structured_latency,
    "semi_structured_24": check_semi_structured_24,
    "offload": check_offload,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only parts are listed as skipped")
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"), help="folder for gpu_check.json")
    p.add_argument("--model", help="default: the SmolLM2-135M GGUF (GPU) or the tiny preset (dry run)")
    p.add_argument("--calib-data", default="pydoc")
    p.add_argument("--val-data", default="pydoc")
    p.add_argument("--eval-data", default="pydoc")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    model = args.model or (str(smollm2_gguf_path() or "") if not args.dry_run else "tiny")
    if not model:
        print(f"error: the SmolLM2-135M GGUF is not installed ({SMOLLM2_INSTALL}) and no --model was given",
              file=sys.stderr)
        return 2
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        print(f"error: unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="raysparse-gpu-check-"))
    run = Run(model=model, calib=args.calib_data, val=args.val_data, test=args.eval_data,
              device=torch.device("cpu" if args.dry_run else "cuda"), sizes=DRY_SIZES if args.dry_run else GPU_SIZES,
              workdir=workdir, skipped=[])
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "model": model, "device": str(run.device), "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(), "threads": torch.get_num_threads(), "sizes": run.sizes.__dict__,
        "checks": {}, "skipped": run.skipped}
    started = time.perf_counter()
    for name in args.checks.split(","):
        logger.info("check %s", name)
        start = time.perf_counter()
        try:
            result = {"status": "ok", **CHECKS[name](run)}
        except Exception as exc:  # record and go on: one broken path must not hide the others
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 2)
        report["checks"][name] = result
        logger.info("check %s: %s in %.1f s", name, result["status"], result["seconds"])
    report["total_s"] = round(time.perf_counter() - started, 2)
    path = out / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    failed = [name for name, r in report["checks"].items() if r["status"] == "failed"]
    for name, r in report["checks"].items():
        print(f"{name:20s} {r['status']:8s} {r['seconds']:8.1f} s" + (f"  {r['error']}" if "error" in r else ""))
    for line in run.skipped:
        print(f"skipped: {line}")
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
