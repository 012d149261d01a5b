"""Which attempt of a search trial this is, where it ran, and where it resumed.

Tune retries a failed trial (`FailureConfig(max_failures=N)`) by calling the trainable
again; the function itself is not told it is a retry. The count therefore lives in a file
in the trial's output folder, which the search puts on the *storage path*, not in Tune's
node-local staging folder: a retry that lands on another node (the first one died) must
see the count and the checkpoint the first attempt left there, or it would call itself
attempt 1 and start over.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from raysparse.paths import write_json_atomic
from raysparse.trial.state import CHECKPOINT_DIR, RESUME_IGNORED, STATE_FILE, SUMMARY_FILE

logger = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.json"


def checkpointed_iterations(output: Path) -> int:
    """How many iterations the trial's own checkpoint holds (0: none, a fresh start)."""

    state_file = output / CHECKPOINT_DIR / STATE_FILE
    try:
        return int(json.loads(state_file.read_text(encoding="utf-8")).get("completed", 0))
    except (OSError, ValueError):
        return 0


def record_attempt(output: Path, node_id: str) -> dict[str, Any]:
    """Count this start of the trial in `output/attempts.json`; return what the results show.

    The returned dict (attempt, node_id, resumed_after) is merged into every Tune report,
    so the results table says which trials were retried and from which iteration.
    """
    output.mkdir(parents=True, exist_ok=True)
    path = output / ATTEMPTS_FILE
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError):
        history = []
    entry = {"attempt": len(history) + 1, "node_id": node_id,
             "resumed_after": checkpointed_iterations(output), "started": time.time()}
    history.append(entry)
    write_json_atomic(path, {"attempt": entry["attempt"], "history": history})
    if entry["attempt"] > 1:
        logger.info("trial %s: attempt %d on node %s, resuming after iteration %d",
                    output.parent.name, entry["attempt"], node_id[:12], entry["resumed_after"])
    return {"attempt": entry["attempt"], "node_id": node_id, "resumed_after": entry["resumed_after"]}


def last_attempt(output: Path) -> dict[str, Any] | None:
    """The attempt that produced what `output` holds (None: no attempt recorded)."""
    try:
        history = json.loads((output / ATTEMPTS_FILE).read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError):
        return None
    if not history:
        return None
    last = history[-1]
    return {"attempt": last["attempt"], "node_id": last["node_id"], "resumed_after": last["resumed_after"]}


def finished_summary(output: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The completed summary of this same trial in `output`, if an earlier run finished it.

    A trial can finish (summary written on the storage path) moments before the driver is
    killed and before Tune saves its experiment state (about every 10 s); the resumed search
    then starts it again. Its result is already on disk: report it instead of re-running.
    """

    try:
        summary = json.loads((output / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("status") != "completed" or not summary.get("history"):
        return None
    saved = {k: v for k, v in (summary.get("config") or {}).items() if k not in RESUME_IGNORED}
    wanted = json.loads(json.dumps({k: v for k, v in config.items() if k not in RESUME_IGNORED}, default=str))
    return summary if saved == wanted else None
