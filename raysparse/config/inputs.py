"""Checks of a trial's inputs that need no model and no torch: the output folder can be
written, every local data file exists and is text, a layer-importance file is readable and
for this model, distributed workers fit this machine. `launch/prune.py` runs them before it
imports torch; `run_trial` runs them again (an API caller gets the same one-line errors).
Nothing here writes a file that stays.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from raysparse.data.text import NAMED_DATASETS, sniff_text_file
from raysparse.errors import ConfigError, DataError

DATA_FLAGS = {"calib_data": "--calib-data", "eval_data": "--eval-data", "val_data": "--val-data",
              "train_data": "--train-data"}


def check_inputs(config: Any) -> None:
    """Every file-level check of a TrialConfig (its settings are validated already)."""
    check_output_dir(config.output)
    for name, flag in DATA_FLAGS.items():
        value = getattr(config, name)
        if value is None or value in NAMED_DATASETS:
            continue
        try:
            sniff_text_file(value)
        except DataError as exc:
            raise DataError(f"{flag}: {exc}") from None
    if config.importance_config:
        read_importance_file(config.importance_config, config.model)


def check_output_dir(output: str | None) -> None:
    """The output folder, or the nearest folder above it that exists, can be written.

    Probed by creating and removing a temporary folder there (os.access says yes to root
    even on /proc), so an unwritable --output is found before the trial runs, not after.
    """
    if output is None:
        return
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory: choose another --output")
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output {output} is inside {parent}, which is not a directory: choose another --output")
    try:
        probe = tempfile.mkdtemp(prefix=".raysparse-write-test-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise ConfigError(f"output {output} cannot be written ({exc.strerror or exc} in {parent}): "
                          "choose another --output") from None


def read_importance_file(path_text: str, model: str) -> dict[str, Any]:
    """The --importance-config file as a mapping, refused when missing, not JSON or for another model."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--importance-config: layer importance file not found: {path_text}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise ConfigError(f"--importance-config: {path_text} is not a layer_importance.json ({reason}): "
                          "point at a file a trial wrote, or drop the flag to compute the importance") from None
    except OSError as exc:
        raise ConfigError(f"--importance-config: {path_text} cannot be read ({exc.strerror})") from None
    if not isinstance(raw, dict) or "model" not in raw or "num_layers" not in raw:
        raise ConfigError(f"--importance-config: {path_text} is not a layer_importance.json (no model and "
                          "num_layers fields): point at a file a trial wrote, or drop the flag")
    if raw["model"] != model:
        raise ConfigError(f"layer importance file {path_text} is for model '{raw['model']}', not '{model}': "
                          "recompute it for this model or point at the right file")
    return raw


def check_local_workers(config: Any) -> None:
    """`launch/prune.py` starts its own Ray for --workers > 1 (unless RAY_ADDRESS names one):
    more workers than this machine has CPUs would wait for resources forever."""
    if config.workers <= 1 or config.recovery != "masked" or os.environ.get("RAY_ADDRESS"):
        return
    cpus = os.cpu_count() or 1
    if config.workers > cpus:
        raise ConfigError(f"--workers {config.workers} needs {config.workers} CPUs (one per worker) but this "
                          f"machine has {cpus}: lower --workers, or set RAY_ADDRESS to a bigger Ray cluster")
