"""What a trial carries from one iteration to the next, and its checkpoint on disk."""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.models.loading import LoadedModel
from raysparse.paths import write_json_atomic
from raysparse.sparsity.masks import Masks, load_masks, save_masks

SUMMARY_FILE = "summary.json"

MODEL_DIR = "model"

CHECKPOINT_DIR = "checkpoint"

RAY_TRAIN_DIR = "ray_train"  # per-epoch checkpoints of distributed recovery

STATE_FILE = "state.json"

# Settings that may change between an interrupted run and its resumption.
RESUME_IGNORED = ("output", "save", "resume", "device", "eval_batch_size", "stats_cache")


@dataclass
class TrialState:
    """What a resumed trial needs: the schedule, what finished, and the history so far."""

    config: dict[str, Any]
    levels: list[float]
    ppl_dense: float
    start_sparsity: float
    completed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    layer_importance: dict[str, Any] | None = None


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_IGNORED}


def load_trial_state(output: Path, config: TrialConfig) -> TrialState | None:
    """The checkpointed state of this same trial in `output`, or None to start fresh."""
    state_file = output / CHECKPOINT_DIR / STATE_FILE
    if not config.resume or not state_file.is_file():
        return None
    state = TrialState(**json.loads(state_file.read_text(encoding="utf-8")))
    saved, wanted = _comparable(state.config), _comparable(config.to_dict())
    if saved != wanted:
        differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ConfigError(
            f"{output} holds a checkpoint of a different trial (settings differ: {', '.join(differing)}): "
            "use another --output, or --no-resume to start over"
        )
    return state


def save_checkpoint(output: Path, state: TrialState, loaded: LoadedModel, masks: Masks) -> None:
    """Write weights, masks and state to a fresh folder, then swap it in (never half-written)."""
    from safetensors.torch import save_model

    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=output))
    save_model(loaded.model, str(staging / "model.safetensors"))
    save_masks(masks, staging)
    write_json_atomic(staging / STATE_FILE, dataclasses.asdict(state))
    final = output / CHECKPOINT_DIR
    old = output / ".checkpoint-old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
    staging.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(output: Path, loaded: LoadedModel) -> Masks:
    from safetensors.torch import load_model as load_weights

    load_weights(loaded.model, str(output / CHECKPOINT_DIR / "model.safetensors"))
    return load_masks(output / CHECKPOINT_DIR)
