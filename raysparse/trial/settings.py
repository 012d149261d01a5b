"""Settings that depend on the model or the preset (windows, default data), resolved and
checked against the model's config before any weights load."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raysparse.config import DEFAULT_MAX_WINDOW, TrialConfig
from raysparse.data.sources import NAMED_DATASETS
from raysparse.errors import ConfigError
from raysparse.models.adapters import adapter_class_for
from raysparse.models.loading import load_config, resolve_model_path
from raysparse.models.tiny import TINY_PRESET_NAME


@dataclass
class ResolvedSettings:
    """Settings that depend on the model (windows) or on the preset (default data)."""

    calib_data: str
    eval_data: str  # test text: reported only
    val_data: str | None  # validation text: every decision; None only when the trial makes none
    train_data: str
    seqlen: int
    eval_seqlen: int
    eval_stride: int
    train_seqlen: int
    context_length: int
    layer_start: int = 0
    layer_end: int = 0  # exclusive; structured pruning touches only layers in [start, end)
    taylor_seqlen: int = 0


def resolve_settings(config: TrialConfig) -> ResolvedSettings:
    """Fill defaults that depend on the model and check windows against its context."""

    path = resolve_model_path(config.model)
    model_config = load_config(path, config.trust_remote_code)
    context = adapter_class_for(model_config.model_type).context_length_of(model_config)
    default_window = min(context, DEFAULT_MAX_WINDOW)
    for name in ("seqlen", "eval_seqlen", "train_seqlen"):
        value = getattr(config, name)
        if value is not None and value > context:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{name} {value} is larger than the model's context of {context} tokens: use {flag} {context} or less"
            )
    num_layers = adapter_class_for(model_config.model_type).num_layers_of(model_config)
    layer_end = config.layer_end if config.layer_end is not None else num_layers
    if config.layer_start >= num_layers or layer_end > num_layers:
        raise ConfigError(
            f"layer range [{config.layer_start}, {layer_end}) is outside the model's {num_layers} decoder layers: "
            f"use --layer-start/--layer-end within 0..{num_layers}"
        )
    is_tiny = config.model == TINY_PRESET_NAME
    calib_data = config.calib_data or ("pydoc" if is_tiny else "c4")
    eval_data = config.eval_data or ("pydoc" if is_tiny else "wikitext2")
    val_data = config.val_data or (eval_data if eval_data in NAMED_DATASETS else None)
    if val_data is None and config.makes_decisions:
        raise ConfigError(
            f"--eval-data {eval_data} is test text, and nothing names validation text for the trial's decisions "
            "(the kept epoch, early stopping): add --val-data PATH (text disjoint from the test file), "
            "or --no-keep-best without --early-stopping-patience"
        )
    eval_seqlen = config.eval_seqlen or default_window
    seqlen = config.seqlen or default_window
    return ResolvedSettings(
        calib_data=calib_data,
        eval_data=eval_data,
        val_data=val_data,
        train_data=config.train_data or calib_data,
        seqlen=seqlen,
        eval_seqlen=eval_seqlen,
        eval_stride=config.eval_stride or eval_seqlen,
        train_seqlen=config.train_seqlen or seqlen,
        context_length=context,
        layer_start=config.layer_start,
        layer_end=layer_end,
        taylor_seqlen=min(config.max_seq_len, context),
    )


def check_output_dir(output: str | None) -> None:
    if output is None:
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory: choose another --output")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output {output} is not writable: choose another --output")
