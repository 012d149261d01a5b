"""GGUF checkpoints (llama.cpp's one-file format) as a trial's model.

Many small pretrained models are published only as quantised GGUF files. transformers reads
them (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package) and dequantises
every weight into an ordinary float model, which is then pruned, trained and saved like any
other: `--save` writes a plain safetensors folder that reloads without `gguf`.

Everything that can go wrong with such a file is checked while the config is read, before
any weights, data or Ray: the optional `gguf` package missing (`pip install 'raysparse[gguf]'`),
an architecture transformers cannot read, a corrupt or truncated file. Each is one line.
Reading a GGUF header parses its whole tokenizer (tens of thousands of strings, seconds), so
the config is parsed once per process and file; the first model load converts the file into
a cached safetensors folder (`gguf_convert.py`) that every later load, and config read, uses.
"""
from __future__ import annotations

import copy
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raysparse.errors import ModelError
from raysparse.models.gguf_convert import ensure_converted, existing_conversion

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
GGUF_MIN_VERSION = "0.10.0"  # what transformers' GGUF loader asks for
INSTALL_HINT = "pip install 'raysparse[gguf]' (or: pip install 'gguf>=0.10')"

# What a damaged file makes the readers raise (numpy reshapes, struct unpacking past the end, ...).
READ_ERRORS = (ValueError, OSError, KeyError, IndexError, TypeError, EOFError, UnicodeDecodeError, struct.error,
               OverflowError, MemoryError)

_CONFIGS: dict[tuple[str, int, int], object] = {}  # (path, size, mtime_ns) -> config


@dataclass(frozen=True)
class GgufFile:
    """A .gguf file as transformers wants it: the folder and the file name inside it."""

    folder: str
    name: str

    @property
    def path(self) -> str:
        return str(Path(self.folder) / self.name)


def is_gguf_path(name_or_path: str) -> bool:
    """True for a path naming a .gguf file (what `resolve_model_path` returns for GGUF input)."""
    return name_or_path.lower().endswith(GGUF_SUFFIX)


def find_gguf(name_or_path: str) -> GgufFile | None:
    """The GGUF file `--model` names: a .gguf file, or a folder without config.json holding exactly one."""
    path = Path(name_or_path).expanduser()
    if is_gguf_path(name_or_path):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name_or_path}")
        path = path.resolve()
        return GgufFile(folder=str(path.parent), name=path.name)
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.glob(f"*{GGUF_SUFFIX}") if p.is_file())
    if len(files) > 1:
        raise ModelError(f"{name_or_path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}): "
                         "point --model at one of them")
    if not files:
        return None
    resolved = files[0].resolve()
    return GgufFile(folder=str(resolved.parent), name=resolved.name)


def require_gguf_package() -> None:
    """Refuse GGUF input up front when the optional `gguf` package is missing or too old."""
    try:
        import gguf  # noqa: F401  (only its presence matters here; transformers uses it)
    except ImportError:
        raise ModelError(f"loading a .gguf model needs the optional 'gguf' package: {INSTALL_HINT}") from None
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("gguf")
    except PackageNotFoundError:
        return  # importable but not installed as a distribution (a source checkout): trust it
    if Version(installed) < Version(GGUF_MIN_VERSION):
        raise ModelError(f"gguf {installed} is too old to read GGUF models (need >= {GGUF_MIN_VERSION}): {INSTALL_HINT}")


def _file_error(gguf: GgufFile, exc: Exception) -> ModelError:
    """One line for what transformers raised: an unsupported architecture, or a damaged file."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if "not supported" in first and "architecture" in first:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping keys, not models
        return ModelError(f"{gguf.path}: {first} (transformers reads GGUF models of: {', '.join(known)})")
    return ModelError(f"cannot read GGUF file {gguf.path}: {first} "
                      f"({type(exc).__name__}; the file is corrupt or truncated: download it again)")


def load_gguf_config(gguf: GgufFile):
    """The model config stored in the GGUF metadata (parsed once per process per file version)."""
    require_gguf_package()
    stat = Path(gguf.path).stat()
    key = (gguf.path, stat.st_size, stat.st_mtime_ns)
    if key not in _CONFIGS:
        from transformers import AutoConfig

        converted = existing_conversion(gguf.path)
        if converted is not None:  # this exact file was read (and checked) before
            return AutoConfig.from_pretrained(converted)
        logger.info("reading GGUF metadata of %s (%.1f MB)", gguf.path, stat.st_size / 1e6)
        try:
            _CONFIGS[key] = AutoConfig.from_pretrained(gguf.folder, gguf_file=gguf.name)
        except READ_ERRORS as exc:
            raise _file_error(gguf, exc) from None
    return copy.deepcopy(_CONFIGS[key])


def _drop_quantizer(model: nn.Module) -> None:
    """Make the dequantised model an ordinary one, so save_pretrained writes plain safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _read_gguf(gguf: GgufFile, folder: Path) -> None:
    """Dequantise the file through transformers (float32, exact) and save model + tokenizer to `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # ask for plain float weights, never packed GGUF blocks (transformers 5.24's GgufConfig)
        from transformers import GgufConfig
        quantization = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # a release without GgufConfig; assumed (not tested here) to dequantise every weight
        quantization = {}
    config = load_gguf_config(gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.folder, gguf_file=gguf.name, config=config, dtype=torch.float32, **quantization,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.folder, gguf_file=gguf.name)
    except READ_ERRORS as exc:
        raise _file_error(gguf, exc) from None
    _drop_quantizer(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def ensure_converted_gguf(gguf: GgufFile) -> Path:
    """The safetensors folder the GGUF file converts to (converted once, then cached)."""
    require_gguf_package()
    return ensure_converted(gguf.path, lambda scratch: _read_gguf(gguf, scratch))


def load_gguf_model(gguf: GgufFile, torch_dtype: torch.dtype) -> tuple[nn.Module, object]:
    """Model (every weight dequantised, then cast to `torch_dtype`) and tokenizer of one GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_converted_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.config.name_or_path = gguf.path
    return model, tokenizer
