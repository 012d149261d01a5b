#!/usr/bin/env python
"""The main job: `python launch/search.py --objective final_ppl` (local Ray, tiny preset, CPU space)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysparse.cli import search_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(search_main())
