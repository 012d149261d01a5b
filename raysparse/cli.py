"""Command-line front ends. Thin: parse flags into a config, call the library, print a report.

Every user-fixable problem (a RaysparseError) becomes one line on stderr and exit code 2,
like argparse's own usage errors; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Sequence

from .config import METHODS, PruneConfig
from .errors import RaysparseError

EXIT_USAGE = 2


def build_prune_parser() -> argparse.ArgumentParser:
    defaults = PruneConfig()
    p = argparse.ArgumentParser(
        prog="launch/prune.py",
        description="Prune a causal LM one-shot and report perplexity before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="JSON/YAML file of settings (e.g. a search's best_config.json); flags override it")
    p.add_argument("--model", help="hub id, local folder, or 'tiny' (offline preset)", default=None)
    p.add_argument("--method", choices=METHODS, default=None, help=f"pruning method (default {defaults.method})")
    p.add_argument("--sparsity", default=None, help=f"fraction in [0,1) or N:M such as 2:4 (default {defaults.sparsity})")
    p.add_argument("--magnitude-scope", choices=("layer", "global"), default=None)
    p.add_argument("--calib-data", default=None, help="wikitext2 | c4 | ptb | pydoc | PATH (.txt/.jsonl)")
    p.add_argument("--eval-data", default=None, help="wikitext2 | c4 | ptb | pydoc | PATH (.txt/.jsonl)")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {defaults.nsamples})")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window (default: model context, max 2048)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: model context, max 2048)")
    p.add_argument("--eval-stride", type=int, default=None, help="evaluation stride (default: the window, no overlap)")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--eval-max-windows", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--calib-batch-size", type=int, default=None)
    p.add_argument("--percdamp", type=float, default=None, help="SparseGPT dampening (fraction of mean diag)")
    p.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--output", default=None, help="folder for summary.json (and the model with --save)")
    p.add_argument("--save", action="store_true", default=None, help="save the pruned model (safetensors)")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    values: dict[str, Any] = PruneConfig.from_file(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(PruneConfig):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
    return PruneConfig.from_dict(values)


def format_prune_report(summary: dict[str, Any]) -> str:
    lines = [
        f"model            {summary['model']} ({summary['family']})",
        f"method           {summary['method']}  pattern {summary['pattern']}  target {summary['sparsity_target']:.4f}",
        f"ppl dense        {summary['ppl_dense']:.4f}",
        f"ppl pruned       {summary['ppl_pruned']:.4f}  ({summary['ppl_change_pct']:+.2f}%)",
        f"sparsity         {summary['sparsity_measured']:.4f} measured from the weights "
        f"({summary['params_zero']:,} / {summary['params_prunable']:,})",
        "per layer        " + "  ".join(f"{k}:{v:.3f}" for k, v in summary["per_layer"].items()),
        "timings (s)      " + "  ".join(f"{k} {v:.2f}" for k, v in summary["timings_s"].items()),
        f"peak memory      {summary['peak_memory_mb']:.0f} MB",
    ]
    protocol = summary["protocol"]
    lines.append(
        f"protocol         eval {protocol['eval_data']} window {protocol['eval_seqlen']} stride {protocol['eval_stride']}"
        f" ({protocol['eval_windows']} windows); calib {protocol['calib_data']} x{protocol['nsamples']}"
        f" seqlen {protocol['seqlen']} seed {protocol['seed']}"
    )
    if summary.get("saved_model"):
        lines.append(f"saved model      {summary['saved_model']}")
    return "\n".join(lines)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def prune_main(argv: Sequence[str] | None = None) -> int:
    args = build_prune_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        from .trial import prune_model

        result = prune_model(config)
    except RaysparseError as exc:
        return fail(str(exc))
    print(format_prune_report(result.summary))
    if config.output:
        print(f"summary          {config.output}/summary.json")
    return 0
