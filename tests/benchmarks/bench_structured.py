"""Benchmark structured (GQA group + MLP channel) pruning: quality, size, speed, analysis cost.

Run on demand (not part of the test suite):

    python tests/benchmarks/bench_structured.py [--models tiny,stories260K] [--ratios 0.1,0.25,0.4]

Every case is one `run_trial` (the code path of launch/prune.py and of search trials), for
each model x ratio x allocation: uniform, inverse with `removal` layer importance, inverse
with `activation` layer importance. Recorded: perplexity dense / after pruning, parameters
before / after, decode and prefill latency per token after vs before (ratio, measured in the
same process), and the time of the layer-importance analysis and of the Taylor scores.

The trained models here are tiny, so their latency is dominated by per-layer overhead; a
latency-only case with a randomly initialised ~100M-parameter Llama-style GQA model (speed
does not depend on the weights' values) shows what shrinking buys at a size where the
matrix products dominate. Writes results/bench_structured.json and .md next to this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from bench_prune import model_cases

from raysparse.metrics.latency import measure_latency
from raysparse.models.adapters import get_adapter
from raysparse.structured.plan import prune_structured
from raysparse.structured.taylor import LayerUnitScores
from raysparse.trial.runner import run_trial

HERE = Path(__file__).resolve().parent
ALLOCATIONS = {
    "uniform": {"pruning_strategy": "uniform"},
    "inverse/removal": {"pruning_strategy": "inverse", "importance_method": "removal"},
    "inverse/activation": {"pruning_strategy": "inverse", "importance_method": "activation"},
}


def run_case(case: dict, ratio: float, allocation: str, eval_windows: int) -> dict:
    values = dict(model=case["model"], method="structured", pruning_ratio=ratio, calib_data=case["calib"],
                  eval_data=case["eval"], seqlen=case["seqlen"], eval_seqlen=case["seqlen"],
                  eval_max_windows=eval_windows, num_examples=10, max_seq_len=128, importance_samples=32,
                  min_pruning_rate=0.0, max_pruning_rate=0.8, alpha=1.0, **ALLOCATIONS[allocation])
    started = time.perf_counter()
    summary = run_trial(values).summary
    structured = summary["structured"]
    row = {
        "model": case["name"], "ratio": ratio, "allocation": allocation,
        "ppl_dense": summary["ppl_dense"], "ppl_pruned": summary["ppl_pruned"],
        "params_before": structured["params_before"], "params_after": structured["params_after"],
        "ratio_achieved": structured["ratio_achieved"],
        "decode_latency_ratio": 1 / structured["decode_speedup"],
        "prefill_latency_ratio": 1 / structured["prefill_speedup"],
        "importance_s": summary["timings_s"].get("importance", 0.0),
        "taylor_s": structured["taylor_seconds"],
        "layer_ratios": [round(r, 3) for r in structured["layer_ratios"]],
        "wall_s": round(time.perf_counter() - started, 2),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "layer_ratios"}), flush=True)
    return row


def latency_only(ratios: list[float], device: torch.device) -> list[dict]:
    """Decode/prefill latency of a ~100M-parameter GQA model before and after shrinking."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    for ratio in ratios:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512)
        model = LlamaForCausalLM(config).eval().to(device)
        adapter = get_adapter(model)
        params_before = sum(p.numel() for p in model.parameters())
        before = measure_latency(model, 512, device, prompt_tokens=128, new_tokens=32, repeats=3)
        layers = adapter.decoder_layers()
        scores = [LayerUnitScores(i, torch.rand(adapter.attention_units(layer).count).tolist(),
                                  torch.rand(adapter.mlp_units(layer).count).tolist())
                  for i, layer in enumerate(layers)]
        prune_structured(adapter, scores, [ratio] * len(layers))
        after = measure_latency(model, 512, device, prompt_tokens=128, new_tokens=32, repeats=3)
        row = {"model": "llama-100M-random (latency only)", "ratio": ratio,
               "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
               "decode_latency_ratio": after.decode_ms_per_token / before.decode_ms_per_token,
               "prefill_latency_ratio": after.prefill_ms_per_token / before.prefill_ms_per_token,
               "decode_ms_before": before.decode_ms_per_token, "decode_ms_after": after.decode_ms_per_token}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], latency_rows: list[dict]) -> str:
    lines = ["| model | ratio | allocation | ppl dense | ppl pruned | params before -> after | achieved | "
             "decode latency (x dense) | prefill latency (x dense) | importance s | taylor s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ratio']} | {r['allocation']} | {r['ppl_dense']:.3f} | {r['ppl_pruned']:.3f} | "
                     f"{r['params_before']:,} -> {r['params_after']:,} | {r['ratio_achieved']:.3f} | "
                     f"{r['decode_latency_ratio']:.2f} | {r['prefill_latency_ratio']:.2f} | {r['importance_s']:.2f} | "
                     f"{r['taylor_s']:.2f} |")
    if latency_rows:
        lines += ["", "| model | ratio | params before -> after | decode ms/token before -> after | decode latency (x dense) "
                  "| prefill latency (x dense) |", "|---|---|---|---|---|---|"]
        for r in latency_rows:
            lines.append(f"| {r['model']} | {r['ratio']} | {r['params_before']:,} -> {r['params_after']:,} | "
                         f"{r['decode_ms_before']:.2f} -> {r['decode_ms_after']:.2f} | {r['decode_latency_ratio']:.2f} | "
                         f"{r['prefill_latency_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,stories260K")
    parser.add_argument("--ratios", default="0.1,0.25,0.4")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--no-latency-model", action="store_true", help="skip the 100M latency-only case")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = [run_case(case, ratio, allocation, args.eval_windows)
            for case in model_cases(args.models.split(",")) for ratio in ratios for allocation in ALLOCATIONS]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latency_rows = [] if args.no_latency_model else latency_only(ratios, device)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "device": str(device),
            "torch": torch.__version__}
    (results / "bench_structured.json").write_text(json.dumps({"meta": meta, "rows": rows, "latency": latency_rows},
                                                              indent=1))
    (results / "bench_structured.md").write_text(markdown(rows, latency_rows))
    print(markdown(rows, latency_rows))


if __name__ == "__main__":
    main()
