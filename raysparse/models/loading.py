"""Load a causal LM (hub id, local folder, the `tiny` preset, a shrunk model) with its adapter.

The config is read first and on its own, so the family and the windows are checked before
any weights load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from raysparse.config.inputs import check_model_folder, is_hub_id
from raysparse.errors import ModelError
from raysparse.models.adapters import ModelAdapter, adapter_class_for, count_params, get_adapter
from raysparse.models.gguf_input import (
    ensure_converted_gguf,
    find_gguf,
    load_gguf_config,
    load_gguf_model,
    require_gguf_package,
)
from raysparse.models.offload import load_disk_offloaded
from raysparse.models.tiny import TINY_PRESET_NAME, ensure_tiny_model

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """Map the `tiny` preset to its cached folder, GGUF input to its file; check local folders hold a model."""

    if name_or_path == TINY_PRESET_NAME:
        return str(ensure_tiny_model())
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        require_gguf_package()
        return gguf.path
    path = Path(name_or_path).expanduser()
    if is_hub_id(name_or_path):
        return name_or_path  # a hub id such as facebook/opt-125m
    check_model_folder(name_or_path)
    return str(path)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for but no CUDA GPU is visible: use --device cpu")
    return torch.device(device)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    path: str


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """Load only the config (cheap), so family and context checks run before the weights."""

    gguf = find_gguf(name_or_path)
    if gguf is not None:
        config = load_gguf_config(gguf)
        adapter_class_for(config.model_type)
        return config
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        local = Path(name_or_path).expanduser().is_dir()
        raise ModelError(
            f"cannot load model '{name_or_path}': {str(exc).splitlines()[0]}"
            + ("" if local else " (no network? pass a local model folder with --model PATH)")
        ) from None
    except ValueError as exc:
        raise ModelError(f"cannot read the config of '{name_or_path}': {str(exc).splitlines()[0]}") from None
    adapter_class_for(config.model_type)
    return config


def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    offload: str = "none",
) -> LoadedModel:
    """Load model + tokenizer from a hub id, a local folder, or the `tiny` preset.

    `offload="disk"` never loads the weights into memory: they are mapped from a scratch
    file (raysparse.models.offload); "cpu" and "none" load them into host memory.
    """

    path = resolve_model_path(name_or_path)
    load_config(path, trust_remote_code)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    gguf = find_gguf(path)
    try:
        if offload == "disk":
            source = str(ensure_converted_gguf(gguf)) if gguf is not None else path
            model = load_disk_offloaded(source, torch_dtype, trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            if gguf is not None:
                model.config.name_or_path = gguf.path
        elif gguf is not None:
            model, tokenizer = load_gguf_model(gguf, torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load model '{name_or_path}': {str(exc).splitlines()[0]}") from None
    model.eval()
    adapter = get_adapter(model)
    logger.info("loaded %s (%s, %s params, %s)", name_or_path, adapter.family,
                f"{count_params(model):,}", torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, path=path)
