"""Models larger than memory: weights on the CPU or on disk, one decoder layer on the device.

`--offload cpu` keeps the loaded model in host memory; `--offload disk` never loads it: the
weights are written once (tensor by tensor, in the trial's dtype) into a scratch safetensors
file, and every parameter becomes a view of that file mapped with MAP_SHARED. Mapped pages
are file-backed page cache, which the kernel reads in on first touch and evicts under
pressure, so the process's own memory stays near one layer's working set however large the
model is; pruning writes its zeros (and SparseGPT its updated weights) straight into the
file. In both modes only the decoder layer being processed is copied to the device, and the
copy is written back into the host (or mapped) storage afterwards, so no second host copy
of a layer is ever made.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from raysparse.errors import ModelError
from raysparse.models.adapters import ModelAdapter

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "cpu", "disk")

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}

_ORIGINAL = "_raysparse_host_data"


def fetch_layer(layer: nn.Module, device: torch.device) -> None:
    """Copy a host-resident layer's parameters and buffers to `device` (no-op when already there)."""
    for tensors in _tensor_slots(layer):
        for name, tensor in list(tensors.items()):
            if tensor is None or tensor.device == device:
                continue
            host = tensor.data
            moved = host.to(device)
            if isinstance(tensor, nn.Parameter):
                tensor.data = moved
                setattr(tensor, _ORIGINAL, host)
            else:
                tensors[name] = moved  # buffers are derived state (rotary tables): no write-back


def release_layer(layer: nn.Module) -> None:
    """Write a fetched layer's parameters back into their host storage and drop the device copy."""
    for tensors in _tensor_slots(layer):
        for name, tensor in list(tensors.items()):
            if tensor is None:
                continue
            host = getattr(tensor, _ORIGINAL, None)
            if isinstance(tensor, nn.Parameter) and host is not None:
                host.copy_(tensor.data)  # the host (or mapped file) storage keeps the pruned values
                tensor.data = host
                delattr(tensor, _ORIGINAL)
            elif not isinstance(tensor, nn.Parameter) and tensor.device.type != "cpu":
                tensors[name] = tensor.cpu()


def _tensor_slots(layer: nn.Module) -> Iterator[dict]:
    for module in layer.modules():
        yield module._parameters
        yield module._buffers


@contextlib.contextmanager
def layers_on_device(adapter: ModelAdapter, device: torch.device) -> Iterator[None]:
    """Run forward passes of a host-resident model with one decoder layer at a time on `device`.

    Everything outside the decoder layers (embeddings, final norm, LM head: small next to
    the layers of a large model) moves to the device for the duration; each decoder layer
    is fetched by a pre-forward hook and written back by a post-forward hook.
    """
    model = adapter.model
    if device.type == "cpu":  # the host is the device: nothing moves
        yield
        return
    layers = list(adapter.decoder_layers())
    layer_ids = {id(layer) for layer in layers}
    outer = [m for m in _outside_layers(model, layer_ids)]
    for module in outer:
        fetch_layer(module, device)
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda module, _args: fetch_layer(module, device)))
        hooks.append(layer.register_forward_hook(lambda module, _args, _out: release_layer(module)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module in outer:
            release_layer(module)


def _outside_layers(model: nn.Module, layer_ids: set[int]) -> list[nn.Module]:
    """The smallest modules that hold every parameter and buffer not inside a decoder layer."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if id(module) in layer_ids:
            return
        children = list(module.children())
        holds_own = any(t is not None for t in module._parameters.values()) or any(
            t is not None for t in module._buffers.values())
        if holds_own or not children:
            found.append(module)  # fetch_layer walks its submodules too
            return
        for child in children:
            visit(child)

    visit(model)
    return found


# ---------------------------------------------------------------------------------------------
# disk: a scratch safetensors file mapped into the parameters


def source_weight_files(path: str) -> list[Path]:
    """The safetensors files of a model folder (a GGUF input's converted folder, a hub snapshot)."""
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as exc:  # noqa: BLE001 - any hub failure is the user's model id
            raise ModelError(f"--offload disk cannot find the weight files of '{path}': "
                             f"{str(exc).splitlines()[0]}") from None
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != "masks.safetensors"]
    if not files:
        raise ModelError(f"--offload disk reads safetensors weights and {path} has none (only *.bin?): "
                         "re-save the model with save_pretrained(safe_serialization=True) or use --offload cpu")
    return files


def write_scratch_file(sources: list[Path], names: dict[str, tuple[torch.Size, torch.dtype]],
                       target: Path) -> dict[str, tuple[int, int]]:
    """Copy the named tensors from `sources` into one safetensors file at `target`, in the given dtypes.

    Tensors are read and written one at a time, so this needs one tensor's memory. Returns
    each tensor's byte range inside the file (absolute offsets).
    """
    where: dict[str, tuple[Path, int, dict]] = {}
    for source in sources:
        length, entries = _read_header(source)
        for key, meta in entries.items():
            where.setdefault(key, (source, 8 + length, meta))
    missing = sorted(set(names) - set(where))
    if missing:
        raise ModelError(f"--offload disk: the weight files lack {len(missing)} of the model's tensors "
                         f"(e.g. {missing[0]}); use --offload cpu for this model")
    header: dict[str, dict] = {}
    offset = 0
    for key, (shape, dtype) in names.items():
        if dtype not in _ST_DTYPES:
            raise ModelError(f"--offload disk does not map {dtype} weights; use --offload cpu")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(len(blob) + 8) % 64)  # data starts 64-byte aligned, so every view is aligned
    start = 8 + len(blob)
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for key, (_shape, dtype) in names.items():
            tensor = _read_tensor(*where[key]).to(dtype).contiguous()
            out.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            del tensor
    return {key: (start + meta["data_offsets"][0], start + meta["data_offsets"][1]) for key, meta in header.items()}


def _read_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header: its byte length and the tensor entries."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            entries = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"--offload disk cannot read {path} as safetensors: {exc}") from None
    entries.pop("__metadata__", None)
    return length, entries


def _read_tensor(path: Path, data_start: int, meta: dict) -> torch.Tensor:
    """One tensor read with plain file reads (safetensors' own loader maps the whole file
    privately, which counts the file against the process's memory limit)."""
    begin, end = meta["data_offsets"]
    with open(path, "rb") as handle:
        handle.seek(data_start + begin)
        raw = bytearray(handle.read(end - begin))
    dtype = {v: k for k, v in _ST_DTYPES.items()}.get(meta["dtype"])
    if dtype is None:
        raise ModelError(f"--offload disk does not read {meta['dtype']} tensors ({path}); use --offload cpu")
    return torch.frombuffer(raw, dtype=dtype).reshape(meta["shape"]) if raw else torch.empty(meta["shape"], dtype=dtype)


def map_parameters(model: nn.Module, target: Path, ranges: dict[str, tuple[int, int]]) -> None:
    """Make every named parameter a view of the file at `target` (MAP_SHARED: writes go to the file)."""
    total = target.stat().st_size
    mapped = torch.from_file(str(target), shared=True, size=total, dtype=torch.uint8)
    for name, param in list(model.named_parameters()):
        begin, end = ranges[name]
        view = mapped[begin:end].view(param.dtype).view(param.shape)
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._parameters[leaf] = nn.Parameter(view, requires_grad=param.requires_grad)


def load_disk_offloaded(path: str, torch_dtype: torch.dtype, trust_remote_code: bool,
                        scratch_dir: str | None = None) -> nn.Module:
    """Build the model without its weights, then map them from a scratch copy on disk.

    The scratch file lives in `scratch_dir` (default: the system temp folder) and is
    unlinked as soon as it is mapped, so it disappears with the process.
    """
    from accelerate import init_empty_weights  # parameters on the meta device, buffers real
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied LM head is the embedding: mapped once
    names = {name: (param.shape, param.dtype) for name, param in model.named_parameters()}
    handle, scratch = tempfile.mkstemp(prefix="raysparse-offload-", suffix=".safetensors", dir=scratch_dir)
    os.close(handle)
    try:
        ranges = write_scratch_file(source_weight_files(path), names, Path(scratch))
        map_parameters(model, Path(scratch), ranges)
    finally:
        os.unlink(scratch)  # the mapping keeps the data alive; the name goes now
    model.tie_weights()
    model.eval()
    logger.info("--offload disk: %s parameters mapped from a scratch file (%.1f MiB)",
                f"{sum(p.numel() for p in model.parameters()):,}",
                sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
    return model
