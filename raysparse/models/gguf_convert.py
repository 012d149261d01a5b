"""A GGUF file dequantised once into a cached safetensors folder, reused by every later load.

Reading a GGUF through transformers costs far more than the model is worth loading: the
135M SmolLM2 file takes about a minute of CPU (its 49K-token tokenizer parsed three times,
tensor-name maps rebuilt per module, numpy dequantisation), against about a second for the
same weights as safetensors. A search loads the model in every trial, so the first load
converts the file (float32: dequantised values are exact there) into
`<cache>/gguf/<name>-<sha256>-tf<version>/` and every later one, in any process, loads
that folder and casts to the trial's dtype. The key is the file's content (a file changed
at the same path gets a new folder) and the transformers version that converted it.
Conversions of one file serialise on a file lock and are renamed into place only when
complete, so concurrent trials convert once and nobody reads half a folder.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import transformers

from raysparse.models.fingerprint import file_digests
from raysparse.paths import cache_dir, exclusive_lock, write_json_atomic

logger = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"  # written last: its presence marks a complete conversion


def _digest(gguf_path: str) -> str:
    """sha256 of the file, remembered by path, size and mtime (a stat() after the first time)."""
    path = Path(gguf_path)
    return file_digests(path)[path.name]


def converted_folder(gguf_path: str, digest: str | None = None) -> Path:
    """Where the conversion of this file's content (by this transformers version) lives."""
    digest = digest or _digest(gguf_path)
    return cache_dir() / "gguf" / f"{Path(gguf_path).stem}-{digest[:16]}-tf{transformers.__version__}"


def existing_conversion(gguf_path: str) -> Path | None:
    """The converted folder if a complete conversion exists, else None."""
    folder = converted_folder(gguf_path)
    return folder if (folder / SOURCE_FILE).is_file() else None


def ensure_converted(gguf_path: str, convert: Callable[[Path], None]) -> Path:
    """The converted folder of `gguf_path`, made by `convert(scratch_folder)` if it does not exist yet."""
    digest = _digest(gguf_path)
    target = converted_folder(gguf_path, digest)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f"{target.name}.lock", f"GGUF conversion of {Path(gguf_path).name}"):
        if (target / SOURCE_FILE).is_file():  # converted by another process while we waited
            return target
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
        os.chmod(scratch, 0o755)  # the cache is meant to be shared
        try:
            logger.info("converting %s to safetensors in %s (once per file)", gguf_path, target)
            convert(scratch)
            write_json_atomic(scratch / SOURCE_FILE, {"gguf": str(Path(gguf_path).resolve()), "sha256": digest,
                                                      "transformers": transformers.__version__})
            if target.exists():  # an incomplete folder from a crashed conversion
                shutil.rmtree(target)
            os.replace(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target
