#!/usr/bin/env python
"""Validate a Ray cluster config offline before `ray up`: `python launch/check_cluster.py cluster.yaml`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysparse.cluster.config_check import validate_cluster_config
from raysparse.errors import RaysparseError

if __name__ == "__main__":
    paths = sys.argv[1:] or ["cluster.yaml"]
    try:
        for path in paths:
            validate_cluster_config(path)
            print(f"{path}: valid")
    except RaysparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
