#!/usr/bin/env python
"""Validate a Ray cluster config offline before `ray up`: `python launch/check_cluster.py cluster.yaml`."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysparse.cluster.config_check import validate_cluster_config
from raysparse.errors import RaysparseError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="launch/check_cluster.py",
                                     description="Validate Ray cluster YAML files offline with Ray's own schema "
                                                 "before `ray up` (no cloud call is made).")
    parser.add_argument("paths", nargs="*", default=["cluster.yaml"], metavar="CLUSTER_YAML",
                        help="cluster config files (default cluster.yaml)")
    args = parser.parse_args()
    try:
        for path in args.paths:
            validate_cluster_config(path)
            print(f"{path}: valid")
    except RaysparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
