"""Where a search trial starts: from Ray Tune's checkpoint of it, or from its finished result.

Tune retries a failed trial (`FailureConfig(max_failures=N)`) and resumes a killed search
(`Tuner.restore`) by calling the trainable again; `tune.get_checkpoint()` then returns the
trial's latest registered checkpoint, which Tune keeps on the search's storage path (a
folder shared by the nodes, or s3://, gs://, file://), so a retry on any node finds it.
An iteration's checkpoint is the trial's own checkpoint folder (trial/checkpoint.py),
installed back into the trial's local output for `run_trial` to resume from; the final
report's checkpoint is the finished output folder, with summary.json.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysparse.cluster.storage import join, list_dirs, read_text
from raysparse.config import TrialConfig
from raysparse.trial.checkpoint import commit, completed_summary, new_staging, read_state
from raysparse.trial.state import STATE_FILE, SUMMARY_FILE, TrialState

if TYPE_CHECKING:
    from ray.tune import Checkpoint

logger = logging.getLogger(__name__)


TUNE_CHECKPOINT_PREFIX = "checkpoint_"  # how Tune names the checkpoint folders in a trial's folder


def _read_json(filesystem: Any, path: str) -> dict[str, Any] | None:
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError):  # not there (an iteration checkpoint), or unreadable
        return None


def finished_in(checkpoint: Checkpoint | None, config: TrialConfig) -> dict[str, Any] | None:
    """The completed summary a Tune checkpoint holds (a final report's), if it is of this trial.

    Reads one file through the checkpoint's own filesystem: an iteration checkpoint holds
    the model weights, which are not worth downloading to find out.
    """
    if checkpoint is None:
        return None
    return completed_summary(_read_json(checkpoint.filesystem, f"{checkpoint.path}/{SUMMARY_FILE}"), config)


def finished_on_storage(trial_uri: str, config: TrialConfig) -> dict[str, Any] | None:
    """A completed summary of this trial among its Tune checkpoints that Tune may not know of.

    Tune saves its experiment state every ~10 s (and after every `num_to_keep` checkpoints
    of a trial). A trial whose final report was persisted moments before the driver was
    killed therefore comes back with an older checkpoint, or none: its result is on
    storage already, so it is replayed instead of run again.
    """
    for name in reversed(list_dirs(trial_uri)):  # newest first: Tune numbers them zero-padded
        if name.startswith(TUNE_CHECKPOINT_PREFIX):
            text = read_text(join(trial_uri, name, SUMMARY_FILE))
            summary = completed_summary(json.loads(text) if text else None, config)
            if summary is not None:
                return summary
    return None


def restore_into(checkpoint: Checkpoint | None, output: Path) -> TrialState | None:
    """Install Tune's checkpoint as the newest checkpoint folder of `output`; its state.

    None when there is no checkpoint or it cannot be read (e.g. removed from storage while
    the experiment state still named it): the trial then starts over, which is slower but
    gives the same result.
    """
    if checkpoint is None:
        return None
    staging = new_staging(output)
    try:
        checkpoint.to_directory(str(staging))
        if (staging / STATE_FILE).is_file():
            return read_state(commit(output, staging))
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("cannot restore checkpoint %s (%s): starting the trial over", checkpoint.path, exc)
    else:
        logger.warning("checkpoint %s holds no trial state: starting the trial over", checkpoint.path)
    shutil.rmtree(staging, ignore_errors=True)
    return None


def last_attempt(summary: dict[str, Any]) -> dict[str, Any]:
    """Where the start that finished the trial ran, as the results table shows it."""
    attempts = summary.get("attempts") or [{}]
    return {"attempt": attempts[-1].get("attempt", len(attempts)), "node_id": attempts[-1].get("node_id"),
            "resumed_after": attempts[-1].get("resumed_after", 0)}
