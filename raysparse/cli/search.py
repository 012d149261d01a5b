"""`launch/search.py`: flags -> SearchSettings -> run_search (or --plan) -> report."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from raysparse.cli.common import fail
from raysparse.errors import RaysparseError
from raysparse.search.plan import format_plan, make_plan
from raysparse.search.results import format_report
from raysparse.search.runner import run_search
from raysparse.search.settings import DEFAULT_SPACE, OBJECTIVES, SearchSettings


def build_search_parser() -> argparse.ArgumentParser:
    defaults = SearchSettings()
    p = argparse.ArgumentParser(
        prog="launch/search.py",
        description="Search pruning + recovery settings with Ray Tune and Optuna; every trial is run_trial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default=defaults.objective,
                   help="final_ppl: min perplexity at the target; ppl_vs_compute: Pareto set of ppl vs training steps")
    p.add_argument("--space", default=str(DEFAULT_SPACE), help="search space YAML (see search_spaces/)")
    p.add_argument("--num-samples", type=int, default=defaults.num_samples)
    p.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent)
    p.add_argument("--cpus-per-trial", type=float, default=defaults.cpus_per_trial)
    p.add_argument("--gpus-per-trial", type=float, default=defaults.gpus_per_trial)
    p.add_argument("--driver-resource", default=defaults.driver_resource,
                   help="custom resource each trial also holds (1 unit), e.g. driver: keeps trials and their "
                        "Train drivers on the nodes that offer it (cluster.yaml: the head)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray instance")
    p.add_argument("--storage", default=defaults.storage, help="folder (or s3://, gs://) for results")
    p.add_argument("--name", default=None, help="experiment name (default search-<timestamp>)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-failures", type=int, default=defaults.max_failures, help="retries per trial")
    p.add_argument("--searcher", choices=("optuna", "random"), default=defaults.searcher)
    p.add_argument("--no-early-stopping", dest="early_stopping", action="store_false")
    p.add_argument("--grace-sparsity-pct", type=int, default=defaults.grace_sparsity_pct,
                   help="first ASHA milestone, in percent sparsity")
    p.add_argument("--resume", default=None, help="experiment folder of an interrupted search")
    p.add_argument("--plan", action="store_true",
                   help="print resources per trial, concurrent trials that fit the cluster and a time estimate "
                        "from a short measured warm-up; launch no search")
    return p


def search_main(argv: Sequence[str] | None = None) -> int:
    args = build_search_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    values = {k: v for k, v in vars(args).items() if k not in ("resume", "plan")}
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
