#!/usr/bin/env python
"""Search the per-layer sparsity profile: `python launch/profile_search.py --model tiny --sparsity 0.7 --output out`."""
# (not launch/profile.py: the script folder comes first on sys.path, and a profile.py there would shadow the
# standard library module of that name, which transformers imports)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysparse.cli.profile import profile_main

if __name__ == "__main__":
    sys.exit(profile_main())
