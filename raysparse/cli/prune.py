"""`launch/prune.py`: flags -> TrialConfig -> run_trial -> report."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

from raysparse.cli.common import EXIT_INTERRUPTED, fail, setup_logging
from raysparse.cli.flags import add_settings, given_settings
from raysparse.cli.format import format_iteration, format_prune_report
from raysparse.config import PruneConfig
from raysparse.config.inputs import check_inputs, check_local_workers
from raysparse.errors import ConfigError, RaysparseError

# Settings an one-shot schedule never reads: given on the command line with --schedule oneshot
# they would be silently ignored, so they are refused instead.
ITERATIVE_ONLY = ("prune_percentage", "max_iterations")


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
    """The --config file's settings (if any), then the flags given on top of them; validated,
    and refused when a flag given would be ignored."""
    values: dict[str, Any] = PruneConfig.from_file(args.config).to_dict() if args.config else {}
    given = given_settings(args, PruneConfig)
    values.update(given)
    config = PruneConfig.from_dict(values).validate()
    if config.schedule == "oneshot":
        ignored = [name for name in ITERATIVE_ONLY if name in given]
        if ignored:
            flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
            raise ConfigError(f"{flags} applies to --schedule iterative only; a one-shot schedule prunes to the "
                              "target at once: add --schedule iterative or drop the flag")
    return config


def prune_main(argv: Sequence[str] | None = None) -> int:
    args = build_prune_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    config: PruneConfig | None = None
    try:
        # Everything that needs no model is checked before torch is even imported.
        config = config_from_args(args)
        check_inputs(config)
        check_local_workers(config)
        from raysparse.trial.runner import TrialFailed, run_trial

        try:
            result = run_trial(config, reporter=lambda record: print(format_iteration(record), flush=True))
        except TrialFailed as exc:
            return fail(str(exc), code=1)
    except RaysparseError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        hint = f"; run the same command again to resume from {config.output}" if config is not None and config.output else ""
        return fail("interrupted" + hint, code=EXIT_INTERRUPTED)
    print(format_prune_report(result.summary))
    if config.output:
        print(f"summary          {config.output}/summary.json")
    return 0
