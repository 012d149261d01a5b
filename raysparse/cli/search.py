"""`launch/search.py`: flags -> SearchSettings -> run_search (or --plan) -> report.

The settings are validated before Ray, Tune or torch are imported, so a bad flag costs a
second, not a Ray start-up.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from raysparse.cli.common import EXIT_INTERRUPTED, fail, setup_logging
from raysparse.cli.flags import add_settings, given_settings
from raysparse.cluster.preflight import check_address_reachable
from raysparse.errors import Interrupted, RaysparseError
from raysparse.search.settings import SearchSettings, check_local_resume


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
    setup_logging(logging.INFO)

    values = given_settings(args, SearchSettings)
    if args.plan:
        if args.resume:
            return fail("--plan plans a new search: drop --resume (a resumed search keeps its recorded settings)")

        try:
            settings = SearchSettings(**values).validate()
            from raysparse.search.plan import format_plan, make_plan

            print(format_plan(make_plan(settings)))
        except RaysparseError as exc:
            return fail(str(exc))
        return 0
    try:
        settings = SearchSettings(**values)
        if args.resume:  # a resumed search runs with its recorded settings
            check_local_resume(args.resume)
        else:
            settings.validate()
            if settings.address:  # a TCP connect: refused in a second, before Ray is imported
                check_address_reachable(settings.address)
        from raysparse.search.results import format_report
        from raysparse.search.runner import run_search

        report = run_search(settings, resume=args.resume)
    except RaysparseError as exc:
        return fail(str(exc))
    except (Interrupted, KeyboardInterrupt) as exc:
        return interrupted(exc)
    print(format_report(report))
    return 0


def interrupted(exc: BaseException) -> int:
    """Ctrl-C: what finished (if anything), then the command that resumes the search; exit 130."""
    if isinstance(exc, Interrupted) and exc.report is not None:
        from raysparse.search.results import format_report

        print(format_report(exc.report), flush=True)
    resume = exc.resume if isinstance(exc, Interrupted) else None
    if resume is None:
        return fail("interrupted before the search started: nothing to resume", code=EXIT_INTERRUPTED)
    print(f"interrupted: resume with  python launch/search.py --resume {resume}", file=sys.stderr)
    return EXIT_INTERRUPTED
