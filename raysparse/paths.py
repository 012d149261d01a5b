"""Where raysparse keeps files it can rebuild (the tiny preset, tokenized streams).

One function, so tests and CI can point every cache at a scratch folder with a single
environment variable instead of patching modules.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

CACHE_ENV = "RAYSPARSE_CACHE_DIR"


def cache_dir() -> Path:
    """The root cache folder: $RAYSPARSE_CACHE_DIR, else $XDG_CACHE_HOME/raysparse, else ~/.cache/raysparse."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "raysparse"
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_json_atomic(path: Path, payload: Mapping[str, Any], sort_keys: bool = False) -> None:
    """Write JSON through a temporary file renamed into place: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, sort_keys=sort_keys) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Block until this process holds the lock building `what`; released on exit or process death."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another process is building it; waiting for %s", what, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
