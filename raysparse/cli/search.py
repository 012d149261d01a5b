"""`launch/search.py`: flags -> SearchSettings -> run_search (or --plan) -> report."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from raysparse.cli.common import fail
from raysparse.cli.flags import add_settings, given_settings
from raysparse.errors import RaysparseError
from raysparse.search.plan import format_plan, make_plan
from raysparse.search.results import format_report
from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings


def build_search_parser() -> argparse.ArgumentParser:
    """Every SearchSettings field from its declaration; --resume and --plan are CLI-only."""
    p = argparse.ArgumentParser(
        prog="launch/search.py",
        description="Search pruning + recovery settings with Ray Tune and Optuna; every trial is run_trial.",
    )
    add_settings(p, SearchSettings)
    p.add_argument("--resume", default=None, help="experiment folder of an interrupted search")
    p.add_argument("--plan", action="store_true",
                   help="print resources per trial, concurrent trials that fit the cluster and a time estimate "
                        "from a short measured warm-up; launch no search")
    return p


def search_main(argv: Sequence[str] | None = None) -> int:
    args = build_search_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    values = given_settings(args, SearchSettings)
    if args.plan:
        if args.resume:
            return fail("--plan plans a new search: drop --resume (a resumed search keeps its recorded settings)")

        try:
            print(format_plan(make_plan(SearchSettings(**values))))
        except RaysparseError as exc:
            return fail(str(exc))
        return 0
    try:
        report = run_search(SearchSettings(**values), resume=args.resume)
    except RaysparseError as exc:
        return fail(str(exc))
    print(format_report(report))
    return 0
