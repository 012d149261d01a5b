"""Load causal LMs and hide architecture differences behind a `ModelAdapter`.

Pruners, mask bookkeeping and (later) structured pruning need the same few facts about a
model: where the decoder layers are, which linear sublayers they hold, how attention heads
group into key/value groups, and how long a window the model accepts. Each family answers
those once in an adapter class; everything else in raysparse is family-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from raysparse.errors import ModelError

try:  # GPT-2 stores its projections as Conv1D with (in, out) weights.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]


LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one attention block: GQA when num_kv_heads < num_heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def queries_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class UnitSlice:
    """Where one kind of structural unit lives inside one linear sublayer.

    Unit ``u`` owns features ``[u * width, (u + 1) * width)`` of the module along `axis`
    (``out``: rows of the (out, in) matrix and the bias; ``in``: columns). A fused projection
    such as GPT-2's ``c_attn`` (q, k and v side by side) repeats the units in `blocks` blocks.
    """

    module: str
    axis: str
    width: int
    blocks: int = 1


@dataclass(frozen=True)
class UnitSpec:
    """The prunable units of one kind in one decoder layer: attention groups or MLP channels."""

    kind: str
    count: int
    slices: tuple[UnitSlice, ...]


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one (possibly shrunk) decoder layer; saved per layer so the model reloads."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


class ModelAdapter:
    """Family-specific facts about a causal LM. Subclasses set the class variables."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -----------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        module: nn.Module = self.model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module  # type: ignore[return-value]

    def prunable_linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        """Every linear sublayer of a decoder layer, by its name inside the layer."""
        return {name: mod for name, mod in layer.named_modules() if isinstance(mod, LINEAR_TYPES)}

    def prunable_modules(self) -> dict[str, nn.Module]:
        """Full module names of every prunable linear (embeddings and lm_head excluded)."""
        result: dict[str, nn.Module] = {}
        for index, layer in enumerate(self.decoder_layers()):
            for name, module in self.prunable_linears(layer).items():
                result[f"{self.layers_path}.{index}.{name}"] = module
        return result

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        """Full parameter names of every prunable weight."""
        return {f"{name}.weight": module.weight for name, module in self.prunable_modules().items()}

    @staticmethod
    def is_transposed(module: nn.Module) -> bool:
        """True for GPT-2's Conv1D, which stores weights as (in_features, out_features)."""
        return isinstance(Conv1D, type) and isinstance(module, Conv1D)

    @classmethod
    def weight_matrix(cls, module: nn.Module) -> torch.Tensor:
        """The weight as an (out_features, in_features) view, whatever the storage layout.

        Writing into the returned tensor writes into the parameter, so pruners can work in
        one orientation for every family.
        """
        return module.weight.data.t() if cls.is_transposed(module) else module.weight.data

    @classmethod
    def to_param_layout(cls, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """Bring an (out, in) tensor (a mask, say) back to the parameter's own layout."""
        return matrix.t().contiguous() if cls.is_transposed(module) else matrix

    @classmethod
    def context_length_of(cls, config) -> int:
        """Longest window the model accepts (read from a bare config, before weights load)."""
        return int(config.max_position_embeddings)

    def context_length(self) -> int:
        return self.context_length_of(self.config)

    def attention_shape(self) -> AttentionShape:
        heads = int(self.config.num_attention_heads)
        kv_heads = int(getattr(self.config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(self.config, "head_dim", None) or self.config.hidden_size // heads)
        return AttentionShape(heads, kv_heads, head_dim)

    def pre_layer_modules(self) -> list[nn.Module]:
        """Modules that run before the first decoder layer (embeddings, rotary tables)."""
        raise NotImplementedError

    def post_layer_modules(self) -> list[nn.Module]:
        """Modules between the last decoder layer and the LM head, in order (the final norm)."""
        raise NotImplementedError

    @classmethod
    def linear_names(cls) -> set[str]:
        """Names of the family's linear layers (what LoRA can target), known without loading weights."""
        return {module.rsplit(".", 1)[-1] for module, *_ in cls.attention_slices + cls.mlp_slices} | {"lm_head"}

    @classmethod
    def num_layers_of(cls, config) -> int:
        """Decoder layer count, read from a bare config (checks layer ranges before loading)."""
        return int(config.num_hidden_layers)

    # --- structural units (structured pruning) -----------------------------------------
    # A subclass names its attention/MLP projections; counts are read from the modules, so
    # they are right for layers that were already shrunk.
    attention_slices: ClassVar[tuple[tuple[str, str, str], ...]] = ()  # (module, axis, "group"|"head")
    mlp_slices: ClassVar[tuple[tuple[str, str], ...]] = ()  # (module, axis); width 1
    attention_count_module: ClassVar[str] = ""  # its out_features / head_dim = groups (per block)
    attention_blocks: ClassVar[int] = 1

    def attention_units(self, layer: nn.Module) -> UnitSpec:
        """Key/value groups: a kv head, every query head sharing it, their o_proj columns."""
        shape = self.attention_shape()
        widths = {"group": shape.queries_per_group * shape.head_dim, "head": shape.head_dim}
        counter = layer.get_submodule(self.attention_count_module)
        count = self.weight_matrix(counter).shape[0] // self.attention_blocks // shape.head_dim
        slices = tuple(UnitSlice(name, axis, widths[unit],
                                 self.attention_blocks if name == self.attention_count_module else 1)
                       for name, axis, unit in self.attention_slices)
        return UnitSpec("attention", count, slices)

    def mlp_units(self, layer: nn.Module) -> UnitSpec:
        """Intermediate channels: a row of the up/gate projections and a column of the down one."""
        first = layer.get_submodule(self.mlp_slices[0][0])
        count = self.weight_matrix(first).shape[0]
        return UnitSpec("mlp", count, tuple(UnitSlice(name, axis, 1) for name, axis in self.mlp_slices))

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        groups = self.attention_units(layer).count
        return LayerShape(num_heads=groups * self.attention_shape().queries_per_group, num_kv_heads=groups,
                          intermediate_size=self.mlp_units(layer).count)

    def set_attention_heads(self, layer: nn.Module, num_heads: int) -> None:
        """Update head-count attributes that the family's attention reads at run time."""


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    attention_slices = (("self_attn.q_proj", "out", "group"), ("self_attn.k_proj", "out", "head"),
                        ("self_attn.v_proj", "out", "head"), ("self_attn.o_proj", "in", "group"))
    attention_count_module = "self_attn.k_proj"
    mlp_slices = (("mlp.gate_proj", "out"), ("mlp.up_proj", "out"), ("mlp.down_proj", "in"))

    # Llama-style attention infers head counts from the projection sizes at run time, so
    # set_attention_heads has nothing to update.

    def pre_layer_modules(self) -> list[nn.Module]:
        inner = self.model.model
        return [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]

    def post_layer_modules(self) -> list[nn.Module]:
        return [self.model.model.norm]


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    attention_slices = (("self_attn.q_proj", "out", "head"), ("self_attn.k_proj", "out", "head"),
                        ("self_attn.v_proj", "out", "head"), ("self_attn.out_proj", "in", "head"))
    attention_count_module = "self_attn.q_proj"
    mlp_slices = (("fc1", "out"), ("fc2", "in"))

    def set_attention_heads(self, layer: nn.Module, num_heads: int) -> None:
        layer.self_attn.num_heads = num_heads

    def pre_layer_modules(self) -> list[nn.Module]:
        dec = self.model.model.decoder
        mods = [dec.embed_tokens, dec.embed_positions, getattr(dec, "project_in", None)]
        return [m for m in mods if m is not None]

    def post_layer_modules(self) -> list[nn.Module]:
        dec = self.model.model.decoder
        return [m for m in (dec.final_layer_norm, getattr(dec, "project_out", None)) if m is not None]


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    attention_slices = (("attn.c_attn", "out", "head"), ("attn.c_proj", "in", "head"))
    attention_count_module = "attn.c_attn"
    attention_blocks = 3  # c_attn holds q, k and v side by side
    mlp_slices = (("mlp.c_fc", "out"), ("mlp.c_proj", "in"))

    @classmethod
    def num_layers_of(cls, config) -> int:
        return int(config.n_layer)

    def set_attention_heads(self, layer: nn.Module, num_heads: int) -> None:
        layer.attn.num_heads = num_heads
        layer.attn.split_size = num_heads * layer.attn.head_dim

    @classmethod
    def context_length_of(cls, config) -> int:
        return int(config.n_positions)

    def attention_shape(self) -> AttentionShape:
        heads = int(self.config.n_head)
        return AttentionShape(heads, heads, self.config.n_embd // heads)

    def pre_layer_modules(self) -> list[nn.Module]:
        return [self.model.transformer.wte, self.model.transformer.wpe]

    def post_layer_modules(self) -> list[nn.Module]:
        return [self.model.transformer.ln_f]


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter, GPT2Adapter)

SHRUNK_PREFIX = "raysparse_"  # model_type of a structurally pruned model with per-layer sizes


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def base_model_type(model_type: str) -> str:
    """The family's own model_type for a shrunk model (`raysparse_llama` -> `llama`)."""
    return model_type[len(SHRUNK_PREFIX):] if model_type.startswith(SHRUNK_PREFIX) else model_type


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    model_type = base_model_type(model_type)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise ModelError(
        f"model family '{model_type}' is not supported; supported model_type values: "
        f"{', '.join(supported_model_types())}"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    return adapter_class_for(model.config.model_type)(model)


def count_params(model: nn.Module) -> int:
    """All parameters of a model (embeddings and head included)."""
    return sum(p.numel() for p in model.parameters())
