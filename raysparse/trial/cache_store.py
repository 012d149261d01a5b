"""Cache values as the object store carries them, and as storage keeps them: formats that run no code.

A value (a float, a dict of lists, a dict of tensors such as pruning masks) becomes a
`Payload`: a JSON-able skeleton plus numpy arrays. Ray hands numpy arrays out zero-copy from
shared memory, so a trial reading a large entry (masks, SparseGPT's weights) on the node
that holds it copies nothing. On storage an entry is `<key>.json` (skeleton, the key's
parts, cost, the digest of the tensor file) and, when the value holds tensors,
`<key>.safetensors`. Neither format can execute anything when read: the cache folder may be
a shared bucket that others can write, and an unpickled file there would run their code in
every trial. A file that does not check out (other key, bad digest, broken JSON or
safetensors) is rejected with a `CacheEntryError`, and the caller recomputes the value.
"""
from __future__ import annotations

import hashlib
import json
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raysparse.errors import RaysparseError

FORMAT = "raysparse-cache/2"

_TENSOR = "__tensor__"

# numpy has no bfloat16: such tensors travel as their int16 bit pattern.
_VIEW_AS = {torch.bfloat16: torch.int16}


class CacheEntryError(RaysparseError):
    """A persisted cache entry failed its checks: it is rejected (never executed) and recomputed."""


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a value."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def normalised(parts: dict[str, Any]) -> Any:
    """The key's parts as they read back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


@dataclass
class Payload:
    """A value split into a JSON-able skeleton and arrays (zero-copy through Ray's object store)."""

    skeleton: Any
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # torch dtype of each array
    seconds: float = 0.0  # what computing the value cost

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + len(json.dumps(self.skeleton, default=str))


def encode(value: Any, seconds: float) -> Payload:
    """Split `value` (JSON-able data with torch tensors anywhere inside) into a Payload."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = item.detach().cpu().contiguous()
            return {_TENSOR: name}
        if isinstance(item, dict):
            if any(not isinstance(k, str) for k in item) or _TENSOR in item:
                raise TypeError(f"cache values need str keys other than {_TENSOR}: {list(item)[:3]}")
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        raise TypeError(f"cannot cache a {type(item).__name__}: use JSON data and torch tensors")

    skeleton = walk(value)
    return Payload(skeleton, {n: _array(t) for n, t in tensors.items()}, {n: _dtype_name(t) for n, t in tensors.items()},
                   float(seconds))


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _array(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.view(_VIEW_AS[tensor.dtype]) if tensor.dtype in _VIEW_AS else tensor).numpy()


def _tensors(payload: Payload) -> dict[str, torch.Tensor]:
    """The payload's arrays as tensors of their recorded dtypes, sharing memory with the arrays."""
    tensors = {}
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; the tensors are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, array in payload.arrays.items():
            dtype = getattr(torch, str(payload.dtypes.get(name, "")), None)
            if not isinstance(dtype, torch.dtype):
                raise CacheEntryError(f"unknown tensor dtype {payload.dtypes.get(name)!r}")
            tensor = torch.from_numpy(array)
            tensors[name] = tensor.view(dtype) if dtype in _VIEW_AS else tensor
    return tensors


def decode(payload: Payload) -> Any:
    """The value back, its tensors sharing the payload's arrays (read-only when Ray served them:
    copy a tensor before writing into it)."""
    return _rebuild(payload.skeleton, _tensors(payload))


def _rebuild(item: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(item, dict):
        if set(item) == {_TENSOR}:
            if item[_TENSOR] not in tensors:
                raise CacheEntryError(f"the value names tensor {item[_TENSOR]!r}, which the tensor file lacks")
            return tensors[item[_TENSOR]]
        return {k: _rebuild(v, tensors) for k, v in item.items()}
    if isinstance(item, list):
        return [_rebuild(v, tensors) for v in item]
    return item


def is_uri(location: str) -> bool:
    return "://" in str(location)


class EntryStore:
    """Cache entries in one folder or under one URI (s3://, gs://, file://: anything pyarrow opens).

    Used by the coordinator actor (read-through, write-through) and, without Ray, by a trial
    of `launch/prune.py --stats-cache DIR`, so both read and write the same entries.
    """

    def __init__(self, location: str):
        import pyarrow.fs

        self.location = location if is_uri(location) else str(Path(location).expanduser().resolve())
        if is_uri(location):
            self.fs, root = pyarrow.fs.FileSystem.from_uri(location)
        else:
            self.fs, root = pyarrow.fs.LocalFileSystem(), self.location
        self.root = root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read(self, name: str) -> bytes | None:
        import pyarrow.fs

        if self.fs.get_file_info(self._path(name)).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(self._path(name)) as stream:
            return stream.read()

    def _write(self, name: str, data: bytes) -> None:
        """Through a temporary name moved into place, so a reader never sees half a file."""
        tmp = self._path(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(data)
        self.fs.move(tmp, self._path(name))

    def exists(self, key: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self._path(f"{key}.json")).type == pyarrow.fs.FileType.File

    def write(self, key: str, parts: dict[str, Any], payload: Payload) -> None:
        """The tensor file first, then the JSON that names its digest (the JSON commits the entry)."""
        tensors = None
        if payload.arrays:
            data = save_safetensors(_tensors(payload))
            self._write(f"{key}.safetensors", data)
            tensors = {"sha256": hashlib.sha256(data).hexdigest(), "dtypes": payload.dtypes}
        entry = {"format": FORMAT, "key": key, "parts": normalised(parts), "seconds": payload.seconds,
                 "value": payload.skeleton, "tensors": tensors}
        self._write(f"{key}.json", json.dumps(entry).encode("utf-8"))

    def read(self, key: str, parts: dict[str, Any]) -> Payload | None:
        """The entry, None when there is none; CacheEntryError when it fails a check."""
        raw = self._read(f"{key}.json")
        if raw is None:
            return None
        where = self._path(f"{key}.json")
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CacheEntryError(f"{where} is not a JSON cache entry") from None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            raise CacheEntryError(f"{where} is not a {FORMAT} entry")
        if entry.get("key") != key or entry.get("parts") != normalised(parts):
            raise CacheEntryError(f"{where} was written for another key")
        seconds = entry.get("seconds")
        if not isinstance(seconds, (int, float)):
            raise CacheEntryError(f"{where} has no computation time")
        tensors = entry.get("tensors")
        if tensors is None:
            return Payload(entry.get("value"), seconds=float(seconds))
        data = self._read(f"{key}.safetensors")
        if data is None or not isinstance(tensors, dict) or hashlib.sha256(data).hexdigest() != tensors.get("sha256"):
            raise CacheEntryError(f"{self._path(f'{key}.safetensors')} is missing or does not match its digest")
        try:
            loaded = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise CacheEntryError(f"{self._path(f'{key}.safetensors')} is not a safetensors file: {exc}") from None
        payload = Payload(entry.get("value"), {n: _array(t) for n, t in loaded.items()},
                          {n: _dtype_name(t) for n, t in loaded.items()}, float(seconds))
        if payload.dtypes != tensors.get("dtypes"):
            raise CacheEntryError(f"{self._path(f'{key}.safetensors')} holds other tensors than its entry names")
        decode(payload)  # every tensor the skeleton names exists
        return payload
