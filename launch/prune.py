#!/usr/bin/env python
"""Prune one model: `python launch/prune.py --model facebook/opt-125m --method wanda --sparsity 0.5`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysparse.cli.prune import prune_main

if __name__ == "__main__":
    sys.exit(prune_main())
