"""--fidelity epochs: one-shot trials report after every recovery epoch, ASHA's rungs count epochs."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import fresh_ray

from raysparse.search.milestones import RECOVERY_EPOCH, asha_rungs, crossed_rungs
from raysparse.search.searcher import _make_scheduler, asha_bounds
from raysparse.search.settings import SearchSettings
from raysparse.search.space_file import parse_space
from raysparse.search.trainable import _trial_metrics
from raysparse.trial.runner import run_trial

ONESHOT = """
fixed:
  model: tiny
  method: magnitude
  schedule: oneshot
  sparsity: 0.6
  recovery: masked
  epochs_per_iteration: 3
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 4
params:
  lr: {choice: [1.0e-6, 1.0e-3, 3.0e-3, 1.0e-2]}
"""


def test_epoch_rungs_stop_below_the_last_epoch_and_each_report_lands_on_its_own_epoch():
    space = parse_space(yaml.safe_load(ONESHOT.replace("epochs_per_iteration: 3", "epochs_per_iteration: 8")), "t")
    settings = SearchSettings(fidelity="epochs", grace_epochs=1)
    assert asha_bounds(settings, space) == (1, 7)
    (bracket,) = _make_scheduler(settings, space=space)._brackets
    # No rung on the last epoch: a stop there would cut the trial before its final report.
    assert sorted(m for m, _ in bracket._rungs) == asha_rungs(1, 2, 7) == [1, 2, 4]
    report = {RECOVERY_EPOCH: 2, "recovery_epoch_before": 1, "val_ppl": 50.0, "val_ppl_before": 70.0}
    assert crossed_rungs(report, "val_ppl", [1, 2, 4], "epochs") == [(2, 50.0)]  # its own value, no interpolation
    # The iteration's report after its epochs crosses nothing new.
    assert crossed_rungs({**report, RECOVERY_EPOCH: 8, "recovery_epoch_before": 0}, "val_ppl", [1, 2, 4],
                         "epochs") == [(1, 50.0), (2, 50.0), (4, 50.0)]
    (bracket,) = _make_scheduler(SearchSettings(fidelity="epochs", reduction_factor=3), space=space)._brackets
    assert sorted(m for m, _ in bracket._rungs) == asha_rungs(1, 3, 7) == [1, 3]
    with pytest.raises(ValueError, match="needs the search space"):
        _make_scheduler(settings)


def test_asha_stops_a_trial_at_an_epoch_rung():
    space = parse_space(yaml.safe_load(ONESHOT), "t")
    scheduler = _make_scheduler(SearchSettings(fidelity="epochs", grace_epochs=1), space=space)
    trials = {name: SimpleNamespace(trial_id=name) for name in ("good", "bad")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name, epoch, ppl):
        return scheduler.on_trial_result(None, trials[name], {RECOVERY_EPOCH: epoch, "recovery_epoch_before": epoch - 1,
                                                              "val_ppl": ppl, "sparsity_pct": 60})

    assert report("good", 1, 40.0) == "CONTINUE"
    assert report("bad", 1, 90.0) == "STOP"  # worse than the better half at epoch 1
    assert report("good", 2, 35.0) == "CONTINUE"


def test_a_trial_reports_every_epoch_with_the_best_so_far(tiny_preset):
    """The epoch records carry what a search report needs; their value is what keep-best would
    return if the trial stopped there, and the last one is the iteration's final value."""
    config = {"model": "tiny", "method": "magnitude", "sparsity": 0.6, "recovery": "masked", "epochs_per_iteration": 3,
              "train_samples": 16, "max_steps": 2, "batch_size": 8, "eval_max_windows": 4, "lr": 3e-3}
    epochs, iterations = [], []
    run_trial(config, reporter=iterations.append, epoch_reporter=epochs.append)
    (final,) = iterations
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    per_epoch = [e["ppl"] for e in final["epochs"]]
    expected = [min([final["ppl_after_prune"], *per_epoch[:k + 1]]) for k in range(3)]
    metrics = [_trial_metrics(e) for e in epochs]
    assert [m["val_ppl"] for m in metrics] == pytest.approx(expected)
    assert metrics[-1]["val_ppl"] == pytest.approx(final["ppl_after_train"])
    assert [m[RECOVERY_EPOCH] for m in metrics] == [1, 2, 3]
    assert [m["train_steps_total"] for m in metrics] == [2, 4, 6]
    assert not any(m["completed"] for m in metrics)  # the summary is still to come
    assert _trial_metrics(final)["completed"] and _trial_metrics(final)[RECOVERY_EPOCH] == 3
    # LoRA recovery reports its epochs too (ranked by the ppl with the adapter).
    lora = []
    run_trial({**config, "recovery": "lora", "lora_target_modules": "q_proj,v_proj", "epochs_per_iteration": 2},
              epoch_reporter=lora.append)
    assert [e["epoch"] for e in lora] == [1, 2]


@pytest.mark.slow  # a real Ray search (about 30 s)
def test_a_search_with_epoch_fidelity_stops_trials_between_epochs(tiny_preset, tmp_path):
    import optuna

    from raysparse.search.runner import run_search

    space = tmp_path / "space.yaml"
    space.write_text(ONESHOT)
    with fresh_ray():
        # One trial at a time: which trial reaches a rung first, and so the stops, do not depend on timing.
        report = run_search(SearchSettings(space=str(space), num_samples=4, max_concurrent=1, searcher="random",
                                           storage=str(tmp_path / "runs"), name="e", seed=0, fidelity="epochs",
                                           grace_epochs=1, final_eval=False, max_failures=0))
    rows = {row["trial_id"]: row for row in report["rows"]}
    study = optuna.load_study(study_name="e", storage=report["optuna_storage"])
    stopped = 0
    for result_file in sorted(Path(report["experiment"]).glob("*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        row = rows[reports[0]["trial_id"]]
        trial = next(t for t in study.trials if t.params["lr"] == pytest.approx(reports[0]["config"]["lr"]))
        assert set(trial.intermediate_values) <= {1, 2}  # Optuna hears the epoch rungs
        if row["status"] == "stopped":
            stopped += 1
            assert reports[-1][RECOVERY_EPOCH] < 3 and row["train_steps_total"] < 6
            assert trial.state == optuna.trial.TrialState.PRUNED
        else:
            assert reports[-1][RECOVERY_EPOCH] == 3 and row["train_steps_total"] == 6
            assert trial.value == pytest.approx(row["val_ppl"])
    # lr 1e-6 barely trains: it is cut at the first rung once a trial that trains has been there.
    lrs = [row["param_lr"] for row in report["rows"]]
    assert stopped >= 1 and any(lr > 1e-6 for lr in lrs)
