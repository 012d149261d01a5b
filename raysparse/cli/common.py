"""What every command shares: a user-fixable error is one line on stderr and exit code 2."""
from __future__ import annotations

import sys

EXIT_USAGE = 2

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
