"""A trial's checkpoint on disk: versioned folders, replaced so that one always exists.

Each checkpoint is written whole under a hidden staging name in the output folder, then
renamed into place as `checkpoint-NNNNNN` (NNNNNN: the iterations it holds), and only
after that rename are the other versions removed. A rename inside one folder is atomic,
so a crash at any instant leaves the previous checkpoint, the new one, or both, never
none; the loader takes the newest complete one and never reads a staging folder (the
next save sweeps those up). The old layout renamed `checkpoint/` aside before moving the
new one in, an instant in which a crash left no checkpoint at all; such a folder is still
read (as the oldest version) and removed by the next save.

One writer for a trial alone and in a search: `launch/prune.py --output DIR` resumes from
the newest folder here, and a search's reporter hands the same folder to Ray Tune as the
iteration's checkpoint; a retried search trial installs Tune's copy here (`new_staging`,
then `commit`) and resumes from it through the same loader.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.models.loading import LoadedModel
from raysparse.paths import write_json_atomic
from raysparse.sparsity.masks import Masks, load_masks, save_masks
from raysparse.trial.state import RESUME_IGNORED, STATE_FILE, TrialState

CHECKPOINT_PREFIX = "checkpoint-"


STAGING_PREFIX = ".checkpoint-staging-"


WEIGHTS_FILE = "model.safetensors"


def checkpoint_name(completed: int) -> str:
    return f"{CHECKPOINT_PREFIX}{completed:06d}"


LEGACY_DIR = "checkpoint"  # the single folder of the old layout: read as the oldest version


def _version(folder: Path) -> int | None:
    if folder.name == LEGACY_DIR:  # so a run interrupted before the upgrade still resumes
        return -1
    digits = folder.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if folder.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def checkpoints(output: Path) -> list[Path]:
    """The complete checkpoint folders in `output`, oldest first."""
    if not output.is_dir():
        return []
    found = [(version, path) for path in output.iterdir()
             if (version := _version(path)) is not None and (path / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output: Path) -> Path | None:
    found = checkpoints(output)
    return found[-1] if found else None


def checkpoint_of(output: Path, completed: int) -> Path | None:
    """The complete checkpoint holding exactly `completed` iterations, if there is one."""
    folder = output / checkpoint_name(completed)
    return folder if (folder / STATE_FILE).is_file() else None


def read_state(folder: Path) -> TrialState:
    return TrialState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))


def differing_settings(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Settings that make two configs different trials (output, device and the like do not)."""
    def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
        # Through JSON, as the saved side went: tuples become lists, paths strings.
        return json.loads(json.dumps({k: v for k, v in config.items() if k not in RESUME_IGNORED}, default=str))

    old, new = comparable(saved), comparable(wanted)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def completed_summary(summary: Mapping[str, Any] | None, config: TrialConfig) -> dict[str, Any] | None:
    """`summary` if it is a completed run of this same trial (then it need not run again)."""
    if not summary or summary.get("status") != "completed" or not summary.get("history"):
        return None
    return dict(summary) if not differing_settings(summary.get("config") or {}, config.to_dict()) else None


def load_trial_state(output: Path, config: TrialConfig) -> TrialState | None:
    """The state of the newest checkpoint of this same trial in `output`, or None to start fresh."""
    folder = latest_checkpoint(output) if config.resume else None
    if folder is None:
        return None
    state = read_state(folder)
    differing = differing_settings(state.config, config.to_dict())
    if differing:
        raise ConfigError(
            f"{output} holds a checkpoint of a different trial (settings differ: {', '.join(differing)}): "
            "use another --output, or --no-resume to start over"
        )
    return state


def restore_checkpoint(output: Path, loaded: LoadedModel) -> Masks:
    """Load the newest checkpoint's weights into `loaded` and return its masks."""
    from safetensors.torch import load_model as load_weights

    folder = latest_checkpoint(output)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint in {output}")
    load_weights(loaded.model, str(folder / WEIGHTS_FILE))
    return load_masks(folder)


def new_staging(output: Path) -> Path:
    """An empty hidden folder in `output` to write (or download) a checkpoint into."""
    output.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output))


def save_checkpoint(output: Path, state: TrialState, loaded: LoadedModel, masks: Masks) -> Path:
    """Write weights, masks and state (state last) to a staging folder, then commit it."""
    from safetensors.torch import save_model

    staging = new_staging(output)
    save_model(loaded.model, str(staging / WEIGHTS_FILE))
    save_masks(masks, staging)
    write_json_atomic(staging / STATE_FILE, dataclasses.asdict(state))
    return commit(output, staging)


def commit(output: Path, staging: Path) -> Path:
    """Rename a complete staging folder into place, then drop every other version."""
    final = output / checkpoint_name(read_state(staging).completed)
    if final.exists():  # the same iterations written again: the version resumed from still exists
        shutil.rmtree(final)
    _rename_into_place(staging, final)
    for entry in output.iterdir():
        if entry != final and (_version(entry) is not None or entry.name.startswith(STAGING_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
    return final


def _rename_into_place(staging: Path, final: Path) -> None:
    """The one atomic step of a save (its own function, so a test can crash the trial here)."""
    os.replace(staging, final)


def clear_checkpoints(output: Path) -> None:
    """Remove every checkpoint version and staging folder (a fresh start or a finished trial)."""
    if not output.is_dir():
        return
    for entry in output.iterdir():
        if _version(entry) is not None or entry.name.startswith(STAGING_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
