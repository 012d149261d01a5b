"""Where raysparse keeps files it can rebuild (the tiny preset, tokenized streams).

One function, so tests and CI can point every cache at a scratch folder with a single
environment variable instead of patching modules.
"""
from __future__ import annotations

import os
from pathlib import Path

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
