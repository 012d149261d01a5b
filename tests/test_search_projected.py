"""--rung-metric projected in a real search: trials measure the projection, ASHA and TPE rank by it."""
import json
from pathlib import Path

import pytest
from conftest import fresh_ray

from raysparse.search.milestones import PROJECTED, asha_rungs, crossed_rungs
from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings

pytestmark = pytest.mark.slow  # a real Ray search (about 20 s); the wiring is unit-tested in test_searcher.py

SPACE = """
fixed:
  model: tiny
  method: magnitude
  schedule: iterative
  sparsity: 0.6
  recovery: masked
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 4
params:
  prune_percentage: {uniform: [0.3, 0.45]}
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


def test_a_search_ranks_its_rungs_by_the_projection(tiny_preset, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with fresh_ray():
        report = run_search(SearchSettings(space=str(space), num_samples=2, max_concurrent=2,
                                           storage=str(tmp_path / "runs"), name="p", seed=0, grace_sparsity_pct=20,
                                           rung_metric="projected", final_eval=False, max_failures=0))
    import optuna

    study = optuna.load_study(study_name="p", storage=report["optuna_storage"])
    rungs, heard = asha_rungs(20), 0
    for result_file in sorted(Path(report["experiment"]).glob("*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        first = reports[0]
        # Below the target the projection is measured and differs from the trial's own ppl.
        assert first[PROJECTED] != pytest.approx(first["val_ppl"], rel=1e-3)
        assert first["val_ppl_projected_before"] is None
        expected = {rung: value for r in reports for rung, value in crossed_rungs(r, PROJECTED, rungs)}
        trial = next(t for t in study.trials if t.params["lr"] == pytest.approx(first["config"]["lr"]))
        # What TPE heard are the projections at the rungs (Tune does not pass on the report at
        # which ASHA stops a trial; the trial is then told PRUNED).
        for step, value in trial.intermediate_values.items():
            assert value == pytest.approx(expected[step])
        heard += len(trial.intermediate_values)
        if reports[-1].get("completed"):  # at the target the projection is the trial's own value
            assert reports[-1][PROJECTED] == reports[-1]["val_ppl"]
            assert trial.value == pytest.approx(reports[-1]["val_ppl"])
    assert heard >= 1
