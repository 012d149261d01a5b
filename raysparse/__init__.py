"""raysparse: find the best way to prune a causal LM and recover its accuracy, on Ray."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PruneConfig", "TrialConfig", "prune_model", "run_trial", "__version__"]


def __getattr__(name: str):
    # Lazy so `import raysparse` stays cheap (torch/transformers load on first use).
    if name in ("PruneConfig", "TrialConfig"):
        from raysparse import config

        return getattr(config, name)
    if name in ("prune_model", "run_trial"):
        from raysparse.trial import runner

        return getattr(runner, name)
    raise AttributeError(name)
