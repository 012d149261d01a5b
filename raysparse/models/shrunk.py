"""Hugging Face model classes for structurally pruned models whose layers differ in size.

transformers builds every decoder layer from one global `num_attention_heads` /
`num_key_value_heads` / `intermediate_size`, so a model whose layers were pruned by
different amounts cannot be described by its family's own config. Each supported family
gets a thin subclass pair here: the config carries ``raysparse_layer_shapes`` (one
{num_heads, num_kv_heads, intermediate_size} per layer) under model_type
``raysparse_<family>``, and the model builds its family's full-size layers, then slices them
to those shapes before weights load (on the meta device inside `from_pretrained`, so no
memory is spent on the full size).

Importing this module registers the classes with `AutoConfig` / `AutoModelForCausalLM`
(the Hugging Face convention for custom architectures), after which
``AutoModelForCausalLM.from_pretrained(folder)`` loads a saved shrunk model; raysparse's own
loader imports it automatically. Tools that never import raysparse (an evaluation harness,
say) load the folder with ``trust_remote_code=True``: `save_pretrained` writes a two-line
``modeling_raysparse.py`` beside the weights and names it in the config's ``auto_map``; it
only imports these classes, so raysparse must be installed there. Everything else (forward, generate, LoRA, FSDP) is the
family's own code: the attention reads head counts from the sliced projection sizes.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from raysparse.models.adapters import SHRUNK_PREFIX, LayerShape, base_model_type, get_adapter
from raysparse.models.resize import layer_shapes, resize_to_shapes

LAYER_SHAPES_KEY = "raysparse_layer_shapes"

REMOTE_CODE_MODULE = "modeling_raysparse"


class _ShrunkModelMixin:
    """Builds the family's layers at full size, then slices them to the saved per-layer shapes."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        shapes = getattr(config, LAYER_SHAPES_KEY, None)
        if shapes:
            resize_to_shapes(get_adapter(self), [LayerShape(**shape) for shape in shapes])  # type: ignore[arg-type]

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Save as the family does, plus the loader file that `trust_remote_code=True` imports."""
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        config_cls = type(self.config)  # type: ignore[attr-defined]
        (Path(save_directory) / f"{REMOTE_CODE_MODULE}.py").write_text(
            '"""Loads a model structurally pruned by raysparse (needs `pip install raysparse`)."""\n'
            f"from raysparse.models.shrunk import {config_cls.__name__}, {type(self).__name__}  # noqa: F401\n",
            encoding="utf-8",
        )
        return result


class ShrunkLlamaConfig(LlamaConfig):
    model_type = SHRUNK_PREFIX + "llama"


class ShrunkLlamaForCausalLM(_ShrunkModelMixin, LlamaForCausalLM):
    config_class = ShrunkLlamaConfig


class ShrunkMistralConfig(MistralConfig):
    model_type = SHRUNK_PREFIX + "mistral"


class ShrunkMistralForCausalLM(_ShrunkModelMixin, MistralForCausalLM):
    config_class = ShrunkMistralConfig


class ShrunkQwen2Config(Qwen2Config):
    model_type = SHRUNK_PREFIX + "qwen2"


class ShrunkQwen2ForCausalLM(_ShrunkModelMixin, Qwen2ForCausalLM):
    config_class = ShrunkQwen2Config


class ShrunkQwen3Config(Qwen3Config):
    model_type = SHRUNK_PREFIX + "qwen3"


class ShrunkQwen3ForCausalLM(_ShrunkModelMixin, Qwen3ForCausalLM):
    config_class = ShrunkQwen3Config


class ShrunkOPTConfig(OPTConfig):
    model_type = SHRUNK_PREFIX + "opt"


class ShrunkOPTForCausalLM(_ShrunkModelMixin, OPTForCausalLM):
    config_class = ShrunkOPTConfig


class ShrunkGPT2Config(GPT2Config):
    model_type = SHRUNK_PREFIX + "gpt2"


class ShrunkGPT2LMHeadModel(_ShrunkModelMixin, GPT2LMHeadModel):
    config_class = ShrunkGPT2Config


SHRUNK_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (ShrunkLlamaConfig, ShrunkLlamaForCausalLM),
    "mistral": (ShrunkMistralConfig, ShrunkMistralForCausalLM),
    "qwen2": (ShrunkQwen2Config, ShrunkQwen2ForCausalLM),
    "qwen3": (ShrunkQwen3Config, ShrunkQwen3ForCausalLM),
    "opt": (ShrunkOPTConfig, ShrunkOPTForCausalLM),
    "gpt2": (ShrunkGPT2Config, ShrunkGPT2LMHeadModel),
}


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the raysparse_* model types (idempotent)."""
    for config_cls, model_cls in SHRUNK_CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # already registered
            pass
        try:
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:
            pass


def mark_shrunk(model: nn.Module) -> None:
    """Turn a model whose layers were sliced in place into its shrunk class, so that its config
    records every layer's size: `save_pretrained` then writes a folder that reloads, and code
    that rebuilds the model from its class and config (Ray Train workers) gets the right shapes."""
    adapter = get_adapter(model)
    family = base_model_type(model.config.model_type)
    if family not in SHRUNK_CLASSES:
        raise ValueError(f"no shrunk model class for model_type '{family}'")
    config_cls, model_cls = SHRUNK_CLASSES[family]
    old_config = model.config
    new_config = copy.deepcopy(old_config)
    new_config.__class__ = config_cls
    new_config.__dict__.pop("model_type", None)  # the class attribute names the shrunk type
    setattr(new_config, LAYER_SHAPES_KEY, [dataclasses.asdict(shape) for shape in layer_shapes(adapter)])
    new_config.architectures = [model_cls.__name__]
    new_config.auto_map = {"AutoConfig": f"{REMOTE_CODE_MODULE}.{config_cls.__name__}",
                           "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.{model_cls.__name__}"}
    for module in model.modules():  # every submodule that shares the config object
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = model_cls


register()
