"""`launch/prune.py`: flags -> TrialConfig -> run_trial -> report."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any, Sequence

from raysparse.cli.common import fail
from raysparse.cli.format import format_iteration, format_prune_report
from raysparse.config import METHODS, RECOVERIES, SCHEDULES, PruneConfig
from raysparse.errors import RaysparseError
from raysparse.trial.runner import TrialFailed, run_trial


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
    p.add_argument("--sparsity", "--target-sparsity", dest="sparsity", default=None,
                   help=f"final sparsity: fraction in [0,1) or N:M such as 2:4 (default {defaults.sparsity})")
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
    s = p.add_argument_group("schedule")
    s.add_argument("--schedule", choices=SCHEDULES, default=None, help="oneshot (default) or iterative")
    s.add_argument("--prune-percentage", type=float, default=None,
                   help=f"iterative: fraction of the remaining weights removed per iteration (default {defaults.prune_percentage})")
    s.add_argument("--max-iterations", type=int, default=None, help=f"iterative: safety bound (default {defaults.max_iterations})")
    r = p.add_argument_group("recovery")
    r.add_argument("--recovery", choices=RECOVERIES, default=None, help="none (default), masked or lora")
    r.add_argument("--epochs-per-iteration", "--epochs", dest="epochs_per_iteration", type=int, default=None)
    r.add_argument("--lr", type=float, default=None, help=f"learning rate (default {defaults.lr}); base lr with --batch-scaled")
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--max-steps", type=int, default=None, help="optimizer steps per epoch at most")
    r.add_argument("--grad-accum", type=int, default=None)
    r.add_argument("--warmup-steps", type=int, default=None)
    r.add_argument("--weight-decay", type=float, default=None)
    r.add_argument("--train-data", default=None, help="training text: wikitext2 | c4 | ptb | pydoc | PATH (default: calibration data)")
    r.add_argument("--train-samples", type=int, default=None, help="training windows")
    r.add_argument("--train-seqlen", type=int, default=None)
    r.add_argument("--batch-scaled", action="store_true", default=None,
                   help="batch-size-aware rule: lr = lr*sqrt(batch), steps = total_samples/batch")
    r.add_argument("--total-samples", type=int, default=None, help="with --batch-scaled, e.g. 10000")
    r.add_argument("--early-stopping-patience", type=int, default=None, help="epochs without perplexity gain")
    r.add_argument("--no-keep-best", dest="keep_best", action="store_false", default=None,
                   help="keep the last epoch instead of the best one")
    r.add_argument("--bf16", choices=("auto", "true", "false"), default=None)
    r.add_argument("--lora-r", type=int, default=None)
    r.add_argument("--lora-alpha", type=int, default=None)
    r.add_argument("--lora-dropout", type=float, default=None)
    r.add_argument("--lora-target-modules", default=None, help="comma-separated linear names (default q_proj,v_proj)")
    r.add_argument("--workers", type=int, default=None, help="Ray Train FSDP workers for masked recovery (1 = in-process)")
    a = p.add_argument_group("per-layer ratios from layer importance")
    a.add_argument("--pruning-strategy", choices=("uniform", "inverse", "proportional"), default=None,
                   help="inverse: important layers pruned less (default uniform)")
    a.add_argument("--alpha", type=float, default=None, help="spread of the ratios (0 uniform, 1 standard, 2-3 aggressive)")
    a.add_argument("--min-pruning-rate", type=float, default=None)
    a.add_argument("--max-pruning-rate", type=float, default=None)
    a.add_argument("--importance-method", choices=("removal", "activation"), default=None)
    a.add_argument("--importance-samples", type=int, default=None)
    a.add_argument("--importance-config", default=None, help="reuse a layer_importance.json (skips the analysis)")
    st = p.add_argument_group("structured pruning (--method structured)")
    st.add_argument("--pruning-ratio", type=float, default=None,
                    help="fraction of the prunable parameters (kv groups + MLP channels) to remove, e.g. 0.25")
    st.add_argument("--num-examples", type=int, default=None,
                    help=f"Taylor importance windows (default {defaults.num_examples})")
    st.add_argument("--max-seq-len", type=int, default=None,
                    help=f"Taylor importance window length (default {defaults.max_seq_len})")
    st.add_argument("--layer-start", type=int, default=None, help="first decoder layer pruned (default 0)")
    st.add_argument("--layer-end", type=int, default=None, help="layer after the last one pruned (default: all)")
    st.add_argument("--test-after-prune", dest="test_after_prune", action="store_true", default=None,
                    help="evaluate perplexity and sample a generation right after pruning (default on)")
    st.add_argument("--no-test-after-prune", dest="test_after_prune", action="store_false",
                    help="skip that evaluation before recovery (recovery's own baseline is used if it takes one)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="start over even if --output holds a checkpoint of this trial")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    values: dict[str, Any] = PruneConfig.from_file(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(PruneConfig):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
    return PruneConfig.from_dict(values)


def prune_main(argv: Sequence[str] | None = None) -> int:
    args = build_prune_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)

        result = run_trial(config, reporter=lambda record: print(format_iteration(record), flush=True))
    except TrialFailed as exc:
        return fail(str(exc), code=1)
    except RaysparseError as exc:
        return fail(str(exc))
    print(format_prune_report(result.summary))
    if config.output:
        print(f"summary          {config.output}/summary.json")
    return 0
