"""raysparse: find the best way to prune a causal LM and recover its accuracy, on Ray."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PruneConfig", "prune_model", "__version__"]


def __getattr__(name: str):
    # Lazy so `import raysparse` stays cheap (torch/transformers load on first use).
    if name == "PruneConfig":
        from .config import PruneConfig

        return PruneConfig
    if name == "prune_model":
        from .trial import prune_model

        return prune_model
    raise AttributeError(name)
