"""The profile search's figure: each profile's ratio per layer beside the fitness curve.

Kept apart from the driver so the driver reads as the search's steps; matplotlib loads only here.
"""
from __future__ import annotations

from pathlib import Path


def write_plot(path: Path, profiles: dict[str, list[float]], curve: list[float], search: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, ratios in profiles.items():
        left.plot(range(len(ratios)), ratios, marker="o", markersize=3, label=label)
    left.set_xlabel("decoder layer")
    left.set_ylabel("pruning ratio")
    left.set_title("per-layer sparsity profile")
    left.legend(fontsize=8)
    right.plot(range(len(curve)), curve, marker=".")
    right.set_xlabel("generation" if search == "evolution" else "batch of proposals")
    right.set_ylabel("KL to dense (validation, highest fidelity)")
    right.set_title(f"fitness ({search})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
