"""What a trial carries from one iteration to the next (and from one start to the next)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUMMARY_FILE = "summary.json"


MODEL_DIR = "model"


RAY_TRAIN_DIR = "ray_train"  # per-epoch checkpoints of distributed recovery


STATE_FILE = "state.json"


# Settings that may change between an interrupted run and its resumption.
RESUME_IGNORED = ("output", "save", "resume", "device", "eval_batch_size", "eval_tasks_batch_size", "stats_cache", "ray_train_storage")


@dataclass
class TrialState:
    """What a resumed trial needs: the schedule, what finished, and the history so far.

    The running totals and the attempt log live here, in the checkpointed state, because a
    retried trial is a new process that knows nothing else of its earlier starts: without
    them a retry would count its training steps and wall time from zero (and look cheaper
    than the uninterrupted run on a compute front) and could not say it is a retry.
    """

    config: dict[str, Any]
    levels: list[float]
    ppl_dense: float
    start_sparsity: float
    completed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    layer_importance: dict[str, Any] | None = None
    train_steps_total: int = 0  # optimizer steps of every finished iteration, whichever start ran it
    wall_s_total: float = 0.0  # wall time of the starts up to the work this state holds
    attempts: list[dict[str, Any]] = field(default_factory=list)  # one entry per start: node, resumed_after
    test_ppl_dense: float | None = None  # the dense model on the test text (report_test), reported only
    zeroshot_dense: dict[str, Any] | None = None  # lm-eval on the dense model, by role (--eval-tasks)
