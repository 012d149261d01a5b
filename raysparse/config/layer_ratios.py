"""The `layer_ratios` JSON a profile search writes and `--layer-ratios FILE` reads (config layer: the
up-front checks read it before any model loads).

It names the model by its fingerprint (config and weight digests) and its layer count, so
a profile searched for one model is never silently applied to another.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from raysparse.errors import ConfigError
from raysparse.paths import write_json_atomic

FORMAT = "raysparse-layer-ratios/1"


def write_layer_ratios(path: str | Path, ratios: Sequence[float], model: str, fingerprint: str, target: float,
                       **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"format": FORMAT, "model": model, "fingerprint": fingerprint, "num_layers": len(ratios),
                             "target": float(target), "layer_ratios": [float(r) for r in ratios], **extra})
    return path


def read_layer_ratios(path_text: str) -> dict[str, Any]:
    """The file as a mapping, refused (one line) when missing, malformed or holding bad ratios."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--layer-ratios: file not found: {path_text}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"--layer-ratios: {path_text} is not JSON: point at a profile search's "
                          "best_profile.json") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("layer_ratios"), list) or "num_layers" not in raw:
        raise ConfigError(f"--layer-ratios: {path_text} has no layer_ratios list and num_layers: point at a "
                          "profile search's best_profile.json")
    try:
        ratios = [float(r) for r in raw["layer_ratios"]]
    except (TypeError, ValueError):
        raise ConfigError(f"--layer-ratios: {path_text} holds a ratio that is not a number") from None
    if len(ratios) != raw["num_layers"]:
        raise ConfigError(f"--layer-ratios: {path_text} has {len(ratios)} ratios but num_layers={raw['num_layers']}")
    bad = [r for r in ratios if not (math.isfinite(r) and 0.0 <= r < 1.0)]
    if bad:
        raise ConfigError(f"--layer-ratios: {path_text} holds the ratio {bad[0]}, outside [0, 1)")
    return {**raw, "layer_ratios": ratios}


def check_layer_ratios(data: dict[str, Any], path_text: str, num_layers: int, fingerprint: str | None,
                       sizes: Sequence[int], target: float) -> list[float]:
    """Refuse a profile for another model (layer count, fingerprint) or another total sparsity."""
    if data["num_layers"] != num_layers:
        raise ConfigError(f"--layer-ratios: {path_text} has {data['num_layers']} layers but the model has "
                          f"{num_layers}: it was searched for another model")
    if fingerprint is not None and data.get("fingerprint") not in (None, fingerprint):
        raise ConfigError(f"--layer-ratios: {path_text} was searched for another model (fingerprint "
                          f"{str(data['fingerprint'])[:12]}, this model {fingerprint[:12]}): search this model's profile")
    ratios = data["layer_ratios"]
    total = sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes)
    if abs(total - target) > 1e-3:
        raise ConfigError(f"--layer-ratios: {path_text} prunes {total:.4f} of the weights in all, not the target "
                          f"{target}: set --sparsity {total:.4g} or search a profile for {target}")
    return ratios
