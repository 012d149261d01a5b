"""What each trial reports to Tune: every objective's metrics, and when a trial counts as completed."""
import pytest

from raysparse.search.results import format_report
from raysparse.search.settings import OBJECTIVES, SearchSettings
from raysparse.search.trainable import _trial_metrics

RECORD = {"ppl_after_train": 20.0, "ppl_after_prune": 25.0, "sparsity": 0.5, "iteration": 1,
          "iterations_planned": 3, "params_remaining": 1000, "recovery_pct": 10.0}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_is_reported_by_every_trial(objective):
    SearchSettings(objective=objective).validate()
    # A zero-shot objective needs --eval-tasks in the space (refused before Ray starts without):
    # such a trial's records carry the validation-split accuracy.
    metrics = _trial_metrics(dict(RECORD, train_steps_total=8, val_zeroshot_acc=0.3))
    for name in OBJECTIVES[objective][0]:
        assert metrics[name] is not None, name


def test_only_the_last_schedule_step_marks_a_trial_completed():
    # A one-shot trial cut by ASHA at its only milestone has done all its work: completed, not stopped.
    assert _trial_metrics(RECORD)["completed"] is False
    assert _trial_metrics(dict(RECORD, iteration=3))["completed"] is True
    assert _trial_metrics({k: v for k, v in RECORD.items() if k != "iterations_planned"})["completed"] is False


def test_the_pareto_line_names_the_objective_metrics():
    row = {"trial_id": "a", "status": "completed", "error": None, "val_ppl": 20.0, "sparsity": 0.25,
           "params_remaining": 685184}
    text = format_report({"rows": [row], "best": row, "best_config": "b.json", "pareto": [row],
                          "pareto_metrics": ["val_ppl", "params_remaining"], "experiment": "x"})
    assert "pareto set (val_ppl vs params_remaining): a (20, 685184)" in text
