"""Where an iterative trial is heading: its current model pruned one-shot to the final target.

Early in an iterative schedule (20-40% sparsity) a trial's own perplexity says little about
its final one (asha_replay.py: Spearman -0.09..0.08 at 20-30%), because at low sparsity every
recipe is still close to the dense model. What the early rungs can see instead is how well
the trajectory prepares the model for the target: prune a copy of the current (recovered)
weights straight to the target with the trial's own method and per-layer ratios and
measure its validation perplexity. Only the prunable weights change, so the copy is those
weights, restored afterwards; the trial's masks, state and random streams are untouched.
At the target itself the projection is the trial's own perplexity.
"""
from __future__ import annotations

import torch

from raysparse.sparsity.masks import Masks
from raysparse.trial.context import TrialContext
from raysparse.trial.state import TrialState
from raysparse.trial.steps import PruneStep


def projected_perplexity(ctx: TrialContext, state: TrialState, step: PruneStep, masks: Masks) -> float:
    """Validation perplexity of the current model pruned one-shot to the trial's target."""
    adapter = ctx.loaded.adapter
    weights = [module.weight for layer in adapter.decoder_layers()
               for module in adapter.prunable_linears(layer).values()]
    saved = [w.detach().clone() for w in weights]
    try:
        step.prune(ctx, state, ctx.config.target_ratio, masks)
        return ctx.evaluate(desc="perplexity projected to the target")
    finally:
        with torch.no_grad():
            for weight, kept in zip(weights, saved):
                weight.copy_(kept)
