"""Rescoring: the search ranks *assembled* models (layers taken from the database), but what
decides is the profile pruned sequentially, as `launch/prune.py` will prune it, judged by
validation perplexity. The best few searched profiles and every profile the search could
have started from are pruned once each; the best on validation wins, so the answer is never
worse there than the profile it started from.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from raysparse.config import TrialConfig
from raysparse.profile.levels import Grid, same_ratios

logger = logging.getLogger(__name__)

MEASURED = ("kl_pruned", "val_ppl", "val_ppl_seeds")  # what a sequential prune of a profile measures


def calibration_draws(ctx, config: TrialConfig, seeds: int) -> list[torch.Tensor]:
    """The trial's calibration windows, then `seeds - 1` other draws (seed + 1, seed + 2, ...)."""
    from raysparse.data.sources import calibration_windows, resolve_source, token_stream

    if seeds == 1:
        return [ctx.calib]
    stream = token_stream(ctx.loaded.tokenizer, resolve_source(ctx.settings.calib_data, "calibration"))
    return [ctx.calib] + [calibration_windows(stream, config.nsamples, ctx.settings.seqlen, config.seed + k)
                          for k in range(1, seeds)]


def rescore(ctx, config: TrialConfig, restore_dense, candidates: list[dict[str, Any]], windows: torch.Tensor,
            reference: torch.Tensor | None, seeds: int = 1, known: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Prune the dense model sequentially (as launch/prune.py will) with each candidate's ratios and
    rank them by validation perplexity: the search ranks *assembled* models, whose order the
    sequential prune does not always keep. Each row also gets the pruned model's own fitness on
    the search's validation windows (`kl_pruned`: KL, or cross-entropy without a `reference`),
    comparable across on- and off-grid candidates. Best first.

    With `seeds` > 1 every candidate is pruned once per calibration draw and ranked by the mean:
    at high sparsity one draw moves perplexity by several percent (profile_variance.py), so
    the best of a dozen single draws is mostly the luckiest draw, not the best profile.

    A candidate with the ratios of a `known` row (measured by an earlier round of the same
    search: same model, windows and draws) takes that row's numbers instead of a new prune."""
    from raysparse.profile.fitness import fitness
    from raysparse.prune import prune

    draws = calibration_draws(ctx, config, seeds)
    rows = []
    for candidate in candidates:
        measured = next((row for row in known if same_ratios(row["ratios"], candidate["ratios"])), None)
        if measured is not None:
            rows.append({**candidate, **{key: measured[key] for key in MEASURED if key in measured},
                         "measured_before": True})
            logger.info("rescored %s: measured before (%s), validation perplexity %.4g", candidate["name"],
                        measured["name"], measured["val_ppl"])
            continue
        fits, vals = [], []
        for calib in draws:
            restore_dense()
            prune(ctx.loaded.adapter, config, calib, ctx.device, candidate["ratios"])
            fits.append(fitness(ctx.loaded.model, windows, reference, windows.shape[0], config.eval_batch_size,
                                ctx.device))
            vals.append(ctx.evaluate(desc="rescoring a profile"))
        row = {**candidate, "kl_pruned": sum(fits) / len(fits), "val_ppl": sum(vals) / len(vals)}
        if seeds > 1:
            row["val_ppl_seeds"] = vals
        rows.append(row)
        logger.info("rescored %s: fitness %.4g after the prune, validation perplexity %.4g%s", candidate["name"],
                    row["kl_pruned"], row["val_ppl"], f" (mean of {seeds} calibration draws)" if seeds > 1 else "")
    restore_dense()
    return sorted(rows, key=lambda row: row["val_ppl"])


def rescore_candidates(result, top: int, grid: Grid, start_candidates: dict[str, list[int]],
                       start_kls: dict[str, float], unsnapped: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The search's best K, and every profile it could have begun from, on the grid and as it
    is (heuristic ratios off the grid): KL picked the start on assembled models, but what
    decides is the validation perplexity of the sequential prune, so the answer is never worse
    there than any of them — nor than the best heuristic itself."""
    rows = [{"name": f"searched #{i + 1}", "profile": profile, "ratios": grid.ratios(profile), "kl": kl}
            for i, (profile, kl) in enumerate(result.top(top))]
    for name, profile in start_candidates.items():
        if all(profile != row["profile"] for row in rows):
            rows.append({"name": f"{name} on the grid", "profile": profile, "ratios": grid.ratios(profile),
                         "kl": result.scored.get(tuple(profile), start_kls.get(name))})
    for name, ratios in unsnapped.items():
        if not any(same_ratios(ratios, row["ratios"]) for row in rows):
            rows.append({"name": name, "profile": None, "ratios": list(ratios), "kl": None})
    return rows
