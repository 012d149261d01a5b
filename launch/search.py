#!/usr/bin/env python
"""The main job: `python launch/search.py --objective final_ppl` (local Ray, tiny preset, CPU space).

`--plan` prints resources per trial, how many trials fit the cluster and a measured time estimate,
then exits without searching; `--address` runs on a cluster (see docs/OPERATORS.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysparse.cli.search import search_main

if __name__ == "__main__":
    sys.exit(search_main())
