"""Checks of a trial's inputs that need no model and no torch: the output folder can be
written, every local data file exists and is text, a layer-importance file is readable and
for this model, distributed workers fit this machine. `launch/prune.py` runs them before it
imports torch; `run_trial` runs them again (an API caller gets the same one-line errors).
Nothing here writes a file that stays.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from raysparse.data.hub import hub_offline_reason
from raysparse.data.text import NAMED_DATASETS, sniff_text_file
from raysparse.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)

HUB_DATASETS = ("wikitext2", "c4", "ptb")  # named datasets that come from the hub (pydoc ships with Python)


DATA_FLAGS = {"calib_data": "--calib-data", "eval_data": "--eval-data", "val_data": "--val-data",
              "train_data": "--train-data"}


def check_inputs(config: Any) -> None:
    """Every file-level check of a TrialConfig (its settings are validated already)."""
    check_output_dir(config.output)
    check_local_model(config.model)
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
    if getattr(config, "layer_ratios", None):
        from raysparse.config.layer_ratios import read_layer_ratios

        read_layer_ratios(config.layer_ratios)
    check_hub(config)


def is_hub_id(model: str) -> bool:
    """A hub id such as facebook/opt-125m, not the preset or a local folder."""
    if model == "tiny":
        return False
    path = Path(model).expanduser()
    return not (path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1)


# Where `datasets` keeps each named hub dataset: repo ids as load_dataset names them (and as
# the hub resolves a canonical name). Looked for in both caches, without the network.
HUB_DATASET_REPOS = {"wikitext2": ("wikitext", "Salesforce/wikitext"), "c4": ("allenai/c4",),
                     "ptb": ("ptb_text_only", "ptb-text-only/ptb_text_only")}


def hub_datasets_read(config: Any) -> dict[str, str]:
    """flag -> hub dataset name, for each hub dataset this trial reads (named or by default)."""
    tiny = config.model == "tiny"
    calib = config.calib_data or ("pydoc" if tiny else "c4")
    evaluation = config.eval_data or ("pydoc" if tiny else "wikitext2")
    # One-shot magnitude without recovery reads no calibration text (training text defaults to it).
    reads_calib = config.method != "magnitude" or config.recovery != "none" or config.pruning_strategy != "uniform"
    read = {"--eval-data": evaluation, "--val-data": config.val_data or evaluation}
    if reads_calib:
        read["--calib-data"] = calib
    if config.recovery != "none" and config.train_data:
        read["--train-data"] = config.train_data
    return {flag: name for flag, name in read.items() if name in HUB_DATASETS}


def hub_dataset_cached(name: str) -> bool:
    """Whether a named hub dataset has files in the local `datasets` or hub cache (no network)."""
    from huggingface_hub import constants

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    for repo in HUB_DATASET_REPOS[name]:
        for folder in (datasets_cache / repo.replace("/", "___"),
                       Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"):
            if folder.is_dir() and any(folder.iterdir()):
                return True
    return False


def check_model_folder(name_or_path: str) -> None:
    """A local --model folder holds a model: config.json that parses, and weight files."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model directory not found: {name_or_path} (give a local folder or a hub id)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{name_or_path} has no config.json: point --model at a Hugging Face model folder "
                         "or a .gguf file")
    try:
        json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise ModelError(f"{name_or_path}/config.json is not valid JSON ({reason}): restore it from the model's "
                         "source (save_pretrained or the hub) or point --model at another folder") from None
    weight_files = [p for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
                    for p in path.glob(pattern)]
    if not weight_files:
        raise ModelError(
            f"{name_or_path} has a config.json but no weights (*.safetensors or *.bin): "
            "copy the weight files into the folder or use save_pretrained"
        )


def check_local_model(model: str) -> None:
    """The model checks that need no torch, so they come before the data checks: a local
    folder (not a GGUF file, nor a folder of GGUF files, which the loader checks) holds a model."""
    path = Path(model).expanduser()
    if model == "tiny" or is_hub_id(model) or model.lower().endswith(".gguf") or (
            path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))):
        return
    check_model_folder(model)


def check_hub(config: Any) -> None:
    """When the model or a dataset comes from the Hugging Face hub and the hub cannot be
    reached, go offline at once instead of half a minute of retries (and every retry's
    warning): cached files still load; a model or dataset that is not cached is refused here,
    before any model loads.

    huggingface_hub and datasets read the offline switches at import; `hub_offline_reason`
    also sets them in modules already imported (lm-eval imports datasets).
    """
    datasets = hub_datasets_read(config)
    if not is_hub_id(config.model) and not datasets:
        return
    why = hub_offline_reason()
    if why is None:
        return
    if is_hub_id(config.model):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(config.model, "config.json"), str):
            raise ConfigError(f"{why} and model '{config.model}' is not in the local cache: pass a local model "
                              "folder with --model PATH, or run where the hub is reachable")
    missing: dict[str, list[str]] = {}
    for flag, name in datasets.items():
        if not hub_dataset_cached(name):
            given = getattr(config, flag[2:].replace("-", "_"))
            missing.setdefault(name, []).append(flag if given else f"{flag} default")
    if missing:
        named = ", ".join(f"{name} ({', '.join(flags)})" for name, flags in missing.items())
        raise DataError(f"{why} and dataset {named} is not in the local cache: pass local text files "
                        "(--calib-data/--val-data/--eval-data PATH), or run where the hub is reachable")


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
