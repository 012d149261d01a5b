"""Settings that depend on the model or the preset (windows, default data), resolved and
checked against the model's config before any weights load."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raysparse.config import DEFAULT_MAX_WINDOW, TrialConfig
from raysparse.config.inputs import read_importance_file
from raysparse.data.text import NAMED_DATASETS, resolve_source
from raysparse.errors import ConfigError, DataError
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
    train_seqlen = config.train_seqlen or seqlen
    adapter = adapter_class_for(model_config.model_type)
    if config.recovery == "lora":
        known = adapter.linear_names()
        missing = [name for name in config.lora_targets if name not in known]
        if missing:
            raise ConfigError(f"LoRA target module(s) {', '.join(missing)} not found in the model "
                              f"({model_config.model_type}); its linear layers are: {', '.join(sorted(known))}")
    if config.importance_config and config.pruning_strategy != "uniform":
        recorded = read_importance_file(config.importance_config, config.model)["num_layers"]
        if recorded != num_layers:
            raise ConfigError(f"layer importance file {config.importance_config} has {recorded} layers but the "
                              f"model has {num_layers}: it was computed for another model")
    windows = [(eval_data, eval_seqlen + 1, "test", "--eval-seqlen"), (val_data, eval_seqlen + 1, "validation",
                                                                          "--eval-seqlen")]
    if not config.is_structured and (config.method != "magnitude" or config.pruning_strategy != "uniform"):
        windows.append((calib_data, seqlen + 1, "calibration", "--seqlen"))
    if config.recovery != "none":
        windows.append((config.train_data or calib_data, train_seqlen + 1, "training", "--train-seqlen"))
    for source, needed, role, flag in windows:
        check_long_enough(source, needed, role, flag)
    return ResolvedSettings(
        calib_data=calib_data,
        eval_data=eval_data,
        val_data=val_data,
        train_data=config.train_data or calib_data,
        seqlen=seqlen,
        eval_seqlen=eval_seqlen,
        eval_stride=config.eval_stride or eval_seqlen,
        train_seqlen=train_seqlen,
        context_length=context,
        layer_start=config.layer_start,
        layer_end=layer_end,
        taylor_seqlen=min(config.max_seq_len, context),
    )


def check_long_enough(source: str | None, tokens: int, role: str, flag: str) -> None:
    """Refuse a local file that cannot hold `tokens` tokens, before any weights load.

    No tokenizer makes more tokens than the text has UTF-8 bytes (plus the BOS/EOS it adds),
    so a file with fewer bytes is too short for certain; the exact check runs once the text
    is tokenized.
    """
    if source is None or source in NAMED_DATASETS:
        return
    path = Path(resolve_source(source, "calibration").name)
    if path.stat().st_size + 2 >= tokens:  # decoding never shrinks the text: long enough to try (no read)
        return
    size = len(path.read_bytes().decode("utf-8", errors="replace").encode("utf-8"))
    if size + 2 < tokens:
        window = "evaluation window" if role in ("test", "validation") else "window"
        raise DataError(f"the {role} text {source} has {size} bytes, fewer than one {window} of {tokens - 1} "
                        f"tokens: give a longer text or a smaller {flag}")
