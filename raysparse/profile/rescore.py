"""Rescoring: the search ranks *assembled* models (layers taken from the database), but what
decides is the profile pruned sequentially, as `launch/prune.py` will prune it, judged by
validation perplexity. The best few searched profiles and every profile the search could
have started from are pruned once each; the best on validation wins, so the answer is never
worse there than the profile it started from.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from raysparse.config import TrialConfig
from raysparse.profile.levels import Grid

logger = logging.getLogger(__name__)


def rescore(ctx, config: TrialConfig, restore_dense, candidates: list[dict[str, Any]], windows: torch.Tensor,
            reference: torch.Tensor | None) -> list[dict[str, Any]]:
    """Prune the dense model sequentially (as launch/prune.py will) with each candidate's ratios and
    rank them by validation perplexity: the search ranks *assembled* models, whose order the
    sequential prune does not always keep. Each row also gets the pruned model's own fitness on
    the search's validation windows (`kl_pruned`: KL, or cross-entropy without a `reference`),
    comparable across on- and off-grid candidates. Best first."""
    from raysparse.profile.fitness import fitness
    from raysparse.prune import prune

    rows = []
    for candidate in candidates:
        restore_dense()
        prune(ctx.loaded.adapter, config, ctx.calib, ctx.device, candidate["ratios"])
        kl = fitness(ctx.loaded.model, windows, reference, windows.shape[0], config.eval_batch_size, ctx.device)
        rows.append({**candidate, "kl_pruned": kl, "val_ppl": ctx.evaluate(desc="rescoring a profile")})
        logger.info("rescored %s: fitness %.4g after the prune, validation perplexity %.4g", candidate["name"], kl,
                    rows[-1]["val_ppl"])
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
        if all(any(abs(a - b) > 1e-9 for a, b in zip(ratios, row["ratios"])) for row in rows):
            rows.append({"name": name, "profile": None, "ratios": list(ratios), "kl": None})
    return rows
