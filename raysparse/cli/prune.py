"""`launch/prune.py`: flags -> TrialConfig -> run_trial -> report."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

from raysparse.cli.common import fail
from raysparse.cli.flags import add_settings, given_settings
from raysparse.cli.format import format_iteration, format_prune_report
from raysparse.config import PruneConfig
from raysparse.errors import RaysparseError
from raysparse.trial.runner import TrialFailed, run_trial


def build_prune_parser() -> argparse.ArgumentParser:
    """--config and -q by hand; every TrialConfig setting from its declaration (raysparse.cli.flags)."""
    p = argparse.ArgumentParser(
        prog="launch/prune.py",
        description="Prune a causal LM one-shot and report perplexity before and after.",
    )
    p.add_argument("--config", help="JSON/YAML file of settings (e.g. a search's best_config.json); flags override it")
    add_settings(p, PruneConfig)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The --config file's settings (if any), then the flags given on top of them."""
    values: dict[str, Any] = PruneConfig.from_file(args.config).to_dict() if args.config else {}
    values.update(given_settings(args, PruneConfig))
    return PruneConfig.from_dict(values)


def prune_main(argv: Sequence[str] | None = None) -> int:
    args = build_prune_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)

        result = run_trial(config, reporter=lambda record: print(format_iteration(record), flush=True))
    except TrialFailed as exc:
        return fail(str(exc), code=1)
    except RaysparseError as exc:
        return fail(str(exc))
    print(format_prune_report(result.summary))
    if config.output:
        print(f"summary          {config.output}/summary.json")
    return 0
