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

from .config import METHODS, RECOVERIES, SCHEDULES, PruneConfig
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


def format_prune_report(summary: dict[str, Any]) -> str:
    lines = [
        f"model            {summary['model']} ({summary['family']})",
        f"method           {summary['method']}  pattern {summary['pattern']}  target {summary['sparsity_target']:.4f}",
        f"ppl dense        {summary['ppl_dense']:.4f}",
        f"ppl pruned       {_number(summary['ppl_pruned'])}",
        f"ppl final        {summary['ppl_final']:.4f}  ({summary['ppl_change_pct']:+.2f}% vs unpruned)"
        + (f"  best {summary['ppl_best']:.4f}" if summary.get("ppl_best") is not None else ""),
        f"iterations       {summary['iterations']} ({summary['schedule']}, recovery {summary['recovery']})",
        *([] if summary.get("structured") else [
            f"sparsity         {summary['sparsity_measured']:.4f} measured from the weights "
            f"({summary['params_zero']:,} / {summary['params_prunable']:,})"]),
        *(_structured_lines(summary["structured"]) if summary.get("structured") else
          ["per layer        " + "  ".join(f"{k}:{v:.3f}" for k, v in summary["per_layer"].items())]),
        *([f"importance       {summary['layer_importance']['method']}: " + "  ".join(
            f"{i}:{v:.4g}" for i, v in enumerate(summary["layer_importance"]["scores"]))]
          if summary.get("layer_importance") else []),
        "timings (s)      " + "  ".join(f"{k} {v:.2f}" for k, v in summary["timings_s"].items()),
        f"peak memory      {summary['peak_memory_mb']:.0f} MB",
    ]
    protocol = summary["protocol"]
    if protocol.get("taylor_examples"):
        calib = f"taylor {protocol['calib_data']} x{protocol['taylor_examples']} seqlen {protocol['taylor_seqlen']}"
    elif protocol["calib_data"]:
        calib = f"calib {protocol['calib_data']} x{protocol['nsamples']} seqlen {protocol['seqlen']}"
    else:
        calib = "no calibration"
    train = (f"; train {protocol['train_data']} x{protocol['train_samples']} seqlen {protocol['train_seqlen']}"
             if protocol.get("train_data") else "")
    lines.append(
        f"protocol         eval {protocol['eval_data']} window {protocol['eval_seqlen']} stride {protocol['eval_stride']}"
        f" ({protocol['eval_windows']} windows); {calib}{train}; seed {protocol['seed']}, {protocol['dtype']}"
    )
    if summary.get("saved_model"):
        lines.append(f"saved model      {summary['saved_model']}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _structured_lines(structured: dict[str, Any]) -> list[str]:
    before, after = structured["latency_before"], structured["latency_after"]
    lines = [
        f"parameters       {structured['params_before']:,} -> {structured['params_after']:,} "
        f"({100 * structured['params_removed_fraction']:.2f}% of the model; "
        f"{100 * structured['ratio_achieved']:.2f}% of layers {structured['layer_range'][0]}-"
        f"{structured['layer_range'][1] - 1})",
        f"latency/token    decode {before['decode_ms_per_token']:.3f} -> {after['decode_ms_per_token']:.3f} ms "
        f"(x{structured['decode_speedup']:.2f}), prefill {before['prefill_ms_per_token']:.4f} -> "
        f"{after['prefill_ms_per_token']:.4f} ms (x{structured['prefill_speedup']:.2f}) on {after['device']}",
        f"taylor           {structured['taylor_seconds']:.2f}s",
        f"{'layer':>16} {'ratio':>6} {'achieved':>8} {'heads':>9} {'kv groups':>9} {'mlp channels':>13}",
    ]
    for plan in structured["layers"]:
        groups_after = plan["groups_before"] - plan["groups_removed"]
        channels_after = plan["channels_before"] - plan["channels_removed"]
        lines.append(f"{plan['layer']:>16} {plan['ratio_target']:6.3f} {plan['ratio_achieved']:8.3f} "
                     f"{plan['heads_before']:>4}->{plan['heads_after']:<4} {plan['groups_before']:>4}->{groups_after:<4} "
                     f"{plan['channels_before']:>6}->{channels_after:<6}")
    return lines


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def format_iteration(record: dict[str, Any]) -> str:
    """One line per finished iteration, as users print by hand today."""
    parts = [f"iter {record['iteration']:>3}", f"sparsity {record['sparsity']:.4f}",
             f"ppl after prune {_number(record['ppl_after_prune'])}", f"after train {record['ppl_after_train']:.4f}"]
    if record.get("recovery_pct") is not None:
        parts.append(f"recovered {record['recovery_pct']:.1f}%")
    if record.get("ppl_with_adapter") is not None:
        parts.append(f"with adapter {record['ppl_with_adapter']:.4f}")
    if record.get("train_loss") is not None:
        parts.append(f"loss {record['train_loss']:.4f}")
    parts.append(f"{record['time_s']:.1f}s")
    return "  ".join(parts)


def prune_main(argv: Sequence[str] | None = None) -> int:
    args = build_prune_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        from .trial import TrialFailed, run_trial

        result = run_trial(config, reporter=lambda record: print(format_iteration(record), flush=True))
    except TrialFailed as exc:
        return fail(str(exc), code=1)
    except RaysparseError as exc:
        return fail(str(exc))
    print(format_prune_report(result.summary))
    if config.output:
        print(f"summary          {config.output}/summary.json")
    return 0


def build_search_parser() -> argparse.ArgumentParser:
    from .search import DEFAULT_SPACE, OBJECTIVES, SearchSettings

    defaults = SearchSettings()
    p = argparse.ArgumentParser(
        prog="launch/search.py",
        description="Search pruning + recovery settings with Ray Tune and Optuna; every trial is run_trial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default=defaults.objective,
                   help="final_ppl: min perplexity at the target; ppl_vs_compute: Pareto set of ppl vs training steps")
    p.add_argument("--space", default=str(DEFAULT_SPACE), help="search space YAML (see search_spaces/)")
    p.add_argument("--num-samples", type=int, default=defaults.num_samples)
    p.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent)
    p.add_argument("--cpus-per-trial", type=float, default=defaults.cpus_per_trial)
    p.add_argument("--gpus-per-trial", type=float, default=defaults.gpus_per_trial)
    p.add_argument("--driver-resource", default=defaults.driver_resource,
                   help="custom resource each trial also holds (1 unit), e.g. driver: keeps trials and their "
                        "Train drivers on the nodes that offer it (cluster.yaml: the head)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray instance")
    p.add_argument("--storage", default=defaults.storage, help="folder (or s3://, gs://) for results")
    p.add_argument("--name", default=None, help="experiment name (default search-<timestamp>)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-failures", type=int, default=defaults.max_failures, help="retries per trial")
    p.add_argument("--searcher", choices=("optuna", "random"), default=defaults.searcher)
    p.add_argument("--no-early-stopping", dest="early_stopping", action="store_false")
    p.add_argument("--grace-sparsity-pct", type=int, default=defaults.grace_sparsity_pct,
                   help="first ASHA milestone, in percent sparsity")
    p.add_argument("--resume", default=None, help="experiment folder of an interrupted search")
    p.add_argument("--plan", action="store_true",
                   help="print resources per trial, concurrent trials that fit the cluster and a time estimate "
                        "from a short measured warm-up; launch no search")
    return p


def search_main(argv: Sequence[str] | None = None) -> int:
    args = build_search_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .search import SearchSettings, format_report, run_search

    values = {k: v for k, v in vars(args).items() if k not in ("resume", "plan")}
    if args.plan:
        if args.resume:
            return fail("--plan plans a new search: drop --resume (a resumed search keeps its recorded settings)")
        from .plan import format_plan, make_plan

        try:
            print(format_plan(make_plan(SearchSettings(**values))))
        except RaysparseError as exc:
            return fail(str(exc))
        return 0
    try:
        report = run_search(SearchSettings(**values), resume=args.resume)
    except RaysparseError as exc:
        return fail(str(exc))
    print(format_report(report))
    return 0
