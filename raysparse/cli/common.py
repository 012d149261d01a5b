"""What every command shares: a user-fixable error is one line on stderr and exit code 2."""
from __future__ import annotations

import logging
import sys

EXIT_USAGE = 2

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def setup_logging(level: int) -> None:
    """Our log format on stderr. Libraries that install their own handler when imported
    (huggingface_hub, transformers, datasets) do not propagate to ours, or each of their
    lines prints twice (before one of them is imported, Python's last-resort handler still
    shows its warnings)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("huggingface_hub", "transformers", "datasets"):
        logging.getLogger(name).propagate = False
