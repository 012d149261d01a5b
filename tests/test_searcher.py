"""The searcher against the installed Ray and Optuna: milestone steps, PRUNED, TPE settings.

These pin the two overrides of OptunaSearch's private state (they break loudly here if a
Ray or Optuna release renames what they touch) and the search settings that decide whether
TPE is more than random search.
"""
import optuna
import pytest

from raysparse.search.searcher import _make_searcher, milestone_optuna_search_class, startup_trials
from raysparse.search.settings import SearchSettings
from raysparse.search.space_file import parse_space

SPACE = {"fixed": {"model": "tiny", "schedule": "iterative", "sparsity": 0.8, "recovery": "masked"},
         "params": {"prune_percentage": {"uniform": [0.25, 0.5]},
                    "pruning_strategy": {"choice": ["uniform", "inverse"]},
                    "alpha": {"uniform": [0.5, 2.0], "when": {"pruning_strategy": "inverse"}}}}


def make_search():
    space = parse_space(SPACE, source="test space")
    search = milestone_optuna_search_class()(space=space.optuna_define_by_run(), metric="val_ppl", mode="min",
                                             sampler=optuna.samplers.RandomSampler(seed=0))
    return search


def test_intermediate_values_reach_optuna_at_the_sparsity_milestone():
    search = make_search()
    assert search.suggest("t1") is not None
    for iteration, (pct, ppl) in enumerate([(25, 30.0), (43, 35.0), (43, 35.0), (80, 50.0)], start=1):
        search.on_trial_result("t1", {"val_ppl": ppl, "sparsity_pct": pct, "training_iteration": iteration})
    (trial,) = search._ot_study.trials
    assert trial.intermediate_values == {25: 30.0, 43: 35.0, 80: 50.0}  # steps are milestones, not iterations


def test_a_trial_stopped_before_its_last_step_is_pruned_and_a_finished_one_complete():
    search = make_search()
    search.suggest("stopped")
    search.suggest("finished")
    search.on_trial_result("stopped", {"val_ppl": 40.0, "sparsity_pct": 25, "training_iteration": 1})
    search.on_trial_complete("stopped", {"val_ppl": 40.0, "sparsity_pct": 25, "completed": False})
    search.on_trial_complete("finished", {"val_ppl": 45.0, "sparsity_pct": 80, "completed": True})
    states = {t.number: t.state for t in search._ot_study.trials}
    assert states == {0: optuna.trial.TrialState.PRUNED, 1: optuna.trial.TrialState.COMPLETE}


def test_tpe_models_conditional_parameters_jointly_and_starts_modelling_within_the_budget(tmp_path):
    space = parse_space(SPACE, source="test space")
    settings = SearchSettings(num_samples=8, storage=str(tmp_path))
    sampler = _make_searcher(space, settings).searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._group is True and sampler._multivariate is True
    assert sampler._n_startup_trials == startup_trials(settings) == 2  # Optuna's 10 would be all random
    assert startup_trials(SearchSettings(num_samples=64)) == 10
    assert startup_trials(SearchSettings(num_samples=64, startup_trials=5)) == 5


@pytest.mark.parametrize("name, cls", [("random", optuna.samplers.RandomSampler),
                                       ("qmc", optuna.samplers.QMCSampler)])
def test_baseline_searchers(name, cls):
    space = parse_space(SPACE, source="test space")
    assert isinstance(_make_searcher(space, SearchSettings(searcher=name)).searcher._sampler, cls)
