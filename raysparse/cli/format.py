"""How a trial reads on the terminal: one line per iteration, then the summary."""
from __future__ import annotations

from typing import Any


def format_prune_report(summary: dict[str, Any]) -> str:
    val = summary["val"]
    lines = [
        f"model            {summary['model']} ({summary['family']})",
        f"method           {summary['method']}  pattern {summary['pattern']}  target {summary['sparsity_target']:.4f}",
        "perplexity       test (reported)  validation (decisions)",
        f"  dense          {_number(summary['ppl_dense']):>15}  {_number(val['ppl_dense']):>22}",
        f"  pruned         {_number(summary['ppl_pruned']):>15}  {_number(val['ppl_pruned']):>22}",
        f"  final          {_number(summary['ppl_final']):>15}  {_number(val['ppl_final']):>22}"
        f"  ({summary['ppl_change_pct']:+.2f}% vs unpruned)  best epoch {_number(val['ppl_best'])}",
        *(_zeroshot_lines(summary["zeroshot"]) if summary.get("zeroshot") else []),
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
        f"protocol         test {protocol['eval_data']} ({protocol['eval_windows']} windows), validation "
        f"{protocol['val_data']} ({protocol['val_windows']} windows), window {protocol['eval_seqlen']} stride "
        f"{protocol['eval_stride']}; {calib}{train}; seed {protocol['seed']}, {protocol['dtype']}"
    )
    if summary.get("saved_model"):
        lines.append(f"saved model      {summary['saved_model']}")
    return "\n".join(lines)


def _zeroshot_lines(zeroshot: dict[str, Any]) -> list[str]:
    from raysparse.metrics.zeroshot import zeroshot_line

    lines = ["zero-shot acc    (lm-eval)"]
    for label, key in (("dense", "test_dense"), ("final", "test_final"), ("dense val", "val_dense"),
                       ("final val", "val_final")):
        if zeroshot.get(key):
            lines.append(f"  {label:<13}{zeroshot_line(zeroshot[key])}")
    return lines


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


def format_iteration(record: dict[str, Any]) -> str:
    """One line per finished iteration, as users print by hand today."""
    parts = [f"iter {record['iteration']:>3}", f"sparsity {record['sparsity']:.4f}",
             f"ppl after prune {_number(record['ppl_after_prune'])}", f"after train {record['ppl_after_train']:.4f}"]
    if record.get("recovery_pct") is not None:
        parts.append(f"recovered {record['recovery_pct']:.1f}%")
    if record.get("ppl_with_adapter") is not None:
        parts.append(f"with adapter {record['ppl_with_adapter']:.4f}")
    if record.get("val_zeroshot_acc") is not None:
        parts.append(f"zero-shot {100 * record['val_zeroshot_acc']:.2f}%")
    if record.get("train_loss") is not None:
        parts.append(f"loss {record['train_loss']:.4f}")
    parts.append(f"{record['time_s']:.1f}s")
    return "  ".join(parts)
