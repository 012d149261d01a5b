"""A real Ray Tune + Optuna search on the tiny preset: results, errors, best config re-run."""
import json

import pytest
from conftest import fresh_ray

from raysparse.cli.prune import prune_main
from raysparse.cli.search import search_main
from raysparse.config import TrialConfig
from raysparse.search.results import pareto_front
from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings

pytestmark = pytest.mark.slow

SPACE = """
description: test space (tiny, 2-3 iterations, a LoRA target that may not exist)
fixed:
  model: tiny
  method: magnitude
  schedule: iterative
  sparsity: 0.5
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 6
params:
  prune_percentage: {uniform: [0.25, 0.45]}
  lr: {loguniform: [1.0e-4, 1.0e-3]}
  recovery: {choice: [masked, lora]}
  lora_target_modules: {choice: ["q_proj,v_proj", "attn_qkv"], when: {recovery: lora}}
"""


@pytest.fixture(scope="module")
def local_ray(tiny_preset):
    with fresh_ray():
        yield


@pytest.fixture(scope="module")
def search_report(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    space = folder / "space.yaml"
    space.write_text(SPACE)
    settings = SearchSettings(space=str(space), num_samples=6, max_concurrent=2, storage=str(folder / "runs"),
                              name="t", searcher="random", seed=3, early_stopping=False, max_failures=0)
    return run_search(settings)


def test_every_trial_has_a_row_and_errors_keep_their_reason(search_report):
    rows = search_report["rows"]
    assert len(rows) == 6
    statuses = [r["status"] for r in rows]
    assert "completed" in statuses and "error" in statuses, statuses
    for row in rows:
        if row["status"] == "error":
            assert "attn_qkv not found" in row["error"]
            assert row["param_lora_target_modules"] == "attn_qkv"
        else:
            assert row["val_ppl"] is not None and row["sparsity"] == pytest.approx(0.5, abs=1 / 64)
    import pyarrow.parquet as pq

    table = pq.read_table(f"{search_report['experiment']}/results.parquet")
    assert table.num_rows == 6
    # A missing LoRA target is refused before the model loads, so the trials that name one
    # compute nothing. The dense validation perplexity is one key for every other trial:
    # computed once, served to the rest and to the final re-run of the best, which computes the
    # test text's once. The first pruning step is keyed by its level, each trial's own
    # prune_percentage, and the final re-run of the best is served its masks.
    ran = 6 - statuses.count("error")
    by_kind = search_report["cache"]["by_kind"]
    assert (by_kind["dense_ppl"]["computed"], by_kind["dense_ppl"]["served"]) == (2, ran)
    assert (by_kind["prune_masks"]["computed"], by_kind["prune_masks"]["served"]) == (ran, 1)
    assert search_report["cache"]["misses"] == 2 + ran and search_report["cache"]["hits"] == ran + 1


def test_best_config_reruns_to_the_same_perplexity(search_report, tmp_path, capsys):
    best = search_report["best"]
    assert best is not None and best["val_ppl"] == min(
        r["val_ppl"] for r in search_report["rows"] if r["status"] == "completed")
    config = TrialConfig.from_file(search_report["best_config"])
    assert config.output is None and config.model == "tiny"
    assert prune_main(["--config", search_report["best_config"], "--output", str(tmp_path / "rerun"), "-q"]) == 0
    rerun = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert rerun["val"]["ppl_final"] == pytest.approx(best["val_ppl"], rel=1e-4)
    # ...and the test perplexity the search reported for it is the re-run's test perplexity.
    assert rerun["ppl_final"] == pytest.approx(best["test_ppl"], rel=1e-4)


def test_pareto_front_keeps_only_non_dominated_rows():
    rows = [{"final_ppl": 10, "train_steps_total": 5}, {"final_ppl": 9, "train_steps_total": 8},
            {"final_ppl": 11, "train_steps_total": 9}]
    assert pareto_front(rows, ["final_ppl", "train_steps_total"]) == rows[:2]


@pytest.mark.parametrize("args,fragment", [
    (["--space", "/nonexistent/space.yaml"], "/nonexistent/space.yaml"),
    (["--objective", "final_ppl", "--cpus-per-trial", "0"], "cpus-per-trial"),
    (["--gpus-per-trial", "1"], "GPUs"),
    (["--resume", "/tmp"], "not a raysparse search folder"),
    (["--storage", "/proc/raysparse"], "cannot be written"),
    (["--space", "WORKERS_SPACE"], "workers=4 need 1 CPU for the trial"),
    (["--driver-resource", "driver"], "no node of the cluster offers that resource"),
    (["--driver-resource", "gpu"], "must name a custom resource"),
    (["--storage", "s3://raysparse-test-bucket/x"], "cannot open storage s3://"),  # no network here
])
def test_search_bad_input_is_one_line_exit_2(local_ray, args, fragment, capsys, tmp_path):
    if "WORKERS_SPACE" in args:
        space = tmp_path / "workers.yaml"
        space.write_text(SPACE.replace("fixed:\n", "fixed:\n  workers: 4\n").replace(
            "recovery: {choice: [masked, lora]}", "recovery: {choice: [masked]}").split("  lora_target")[0])
        args = [str(space) if a == "WORKERS_SPACE" else a for a in args]
    if "--storage" not in args:
        args = args + ["--storage", str(tmp_path)]
    assert search_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and fragment in err, err


def test_plots_and_optuna_study_are_written(search_report):
    from pathlib import Path

    names = {Path(p).name for p in search_report["plots"]}
    assert {"ppl_vs_sparsity.png", "objective_vs_trial.png"} <= names
    assert all(Path(p).stat().st_size > 1000 for p in search_report["plots"])
    import optuna

    study = optuna.load_study(study_name="t", storage=search_report["optuna_storage"])
    assert len(study.trials) == 6


def test_a_trial_stopped_at_a_milestone_reaches_optuna_as_pruned():
    import optuna

    from raysparse.search.searcher import milestone_optuna_search_class
    from raysparse.search.space_file import parse_space

    space = parse_space({"fixed": {"sparsity": 0.5}, "params": {"lr": {"loguniform": [1e-4, 1e-3]}}}, source="t")
    searcher = milestone_optuna_search_class()(space=space.optuna_define_by_run(), metric="final_ppl", mode="min",
                                               sampler=optuna.samplers.RandomSampler(seed=0))
    for trial_id in ("stopped", "done"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_complete("stopped", {"final_ppl": 30.0, "completed": False})
    searcher.on_trial_complete("done", {"final_ppl": 40.0, "completed": True})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]

