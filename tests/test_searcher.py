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


def make_search(**kwargs):
    space = parse_space(SPACE, source="test space")
    search = milestone_optuna_search_class()(space=space.optuna_define_by_run(), metric="val_ppl", mode="min",
                                             sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)
    return search


def test_intermediate_values_reach_optuna_at_the_sparsity_milestone():
    search = make_search()
    assert search.suggest("t1") is not None
    for iteration, (pct, ppl) in enumerate([(25, 30.0), (43, 35.0), (43, 35.0), (80, 50.0)], start=1):
        search.on_trial_result("t1", {"val_ppl": ppl, "sparsity_pct": pct, "training_iteration": iteration})
    (trial,) = search._ot_study.trials
    assert trial.intermediate_values == {25: 30.0, 43: 35.0, 80: 50.0}  # steps are milestones, not iterations


@pytest.mark.parametrize("stopped, state", [("pruned", optuna.trial.TrialState.PRUNED),
                                            ("ignore", optuna.trial.TrialState.FAIL)])
def test_a_trial_stopped_before_its_last_step_is_pruned_and_a_finished_one_complete(stopped, state):
    search = make_search(stopped=stopped)
    search.suggest("stopped")
    search.suggest("finished")
    search.on_trial_result("stopped", {"val_ppl": 40.0, "sparsity_pct": 25, "training_iteration": 1})
    search.on_trial_complete("stopped", {"val_ppl": 40.0, "sparsity_pct": 25, "completed": False})
    search.on_trial_complete("finished", {"val_ppl": 45.0, "sparsity_pct": 80, "completed": True})
    states = {t.number: t.state for t in search._ot_study.trials}
    assert states == {0: state, 1: optuna.trial.TrialState.COMPLETE}
    if stopped == "ignore":  # TPE models only what finished: the stopped trial is not among its trials
        tpe_seen = search._ot_study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        assert [t.number for t in tpe_seen] == [1]
    settings = SearchSettings(stopped_trials=stopped)
    assert _make_searcher(parse_space(SPACE, source="test space"), settings).searcher._stopped_state == state


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


def test_rungs_match_rays_asha_and_values_are_interpolated_to_the_rung():
    from raysparse.search.milestones import asha_rungs, crossed_rungs, value_at
    from raysparse.search.searcher import _make_scheduler

    scheduler = _make_scheduler(SearchSettings(grace_sparsity_pct=20))
    (bracket,) = scheduler._brackets
    assert asha_rungs(20) == sorted(m for m, _ in bracket._rungs) == [20, 40, 80]
    assert value_at(20, (0, 10.0), (40, 40.0)) == pytest.approx(20.0)  # geometric mean: linear in log-ppl
    # A trial pruning 48% at once crosses 20 and 40 in one report; its next report (73%) crosses none.
    first = {"sparsity_pct": 48, "val_ppl": 40.0, "sparsity_pct_before": 0, "val_ppl_before": 30.0}
    assert [rung for rung, _ in crossed_rungs(first, "val_ppl", [20, 40, 80])] == [20, 40]
    assert crossed_rungs(first, "val_ppl", [20, 40, 80])[0][1] == pytest.approx(30.0 * (40 / 30) ** (20 / 48))
    later = {"sparsity_pct": 73, "val_ppl": 60.0, "sparsity_pct_before": 48, "val_ppl_before": 40.0}
    assert crossed_rungs(later, "val_ppl", [20, 40, 80]) == []
    # Without the previous point (reports of older trials) the report's own value is used.
    assert crossed_rungs({"sparsity_pct": 26, "val_ppl": 38.0}, "val_ppl", [20, 40, 80]) == [(20, 38.0)]


def test_asha_judges_a_fast_trial_at_the_rungs_it_jumped_not_at_its_next_report():
    """The bias bench_search found: Ray's ASHA recorded a trial that jumped from 0 to 48% at
    rung 40 only, then recorded its 73% perplexity at rung 20 and stopped it against the
    others' 20% values. Now the jump is judged at 20 and 40, with values at those levels."""
    from types import SimpleNamespace

    from raysparse.search.searcher import _make_scheduler

    scheduler = _make_scheduler(SearchSettings(grace_sparsity_pct=20))
    trials = {name: SimpleNamespace(trial_id=name) for name in ("slow1", "slow2", "fast")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name, before, pct, ppl_before, ppl):
        return scheduler.on_trial_result(None, trials[name], {"sparsity_pct": pct, "val_ppl": ppl,
                                                              "sparsity_pct_before": before, "val_ppl_before": ppl_before})

    dense = 36.0
    assert report("slow1", 0, 26, dense, 38.0) == "CONTINUE"
    assert report("slow2", 0, 26, dense, 37.5) == "CONTINUE"  # better than slow1 (worse would be stopped)
    # The fast trial is better at 20% and 40% once compared at equal sparsity: kept.
    assert report("fast", 0, 48, dense, 39.0) == "CONTINUE"
    rungs = {m: recorded for m, recorded in scheduler._brackets[0]._rungs}
    assert set(rungs[20]) == {"slow1", "slow2", "fast"} and set(rungs[40]) == {"fast"}
    assert -rungs[20]["fast"] < 38.0  # its value at 20%, not at 48%
    assert report("fast", 48, 73, 39.0, 60.0) == "CONTINUE"  # 73% crosses no new rung: nothing compared
    assert -rungs[20]["fast"] < 38.0 and "fast" not in rungs[80]
    # A replayed report changes nothing.
    assert report("fast", 0, 48, dense, 39.0) == "CONTINUE" and scheduler._num_stopped == 0


def test_with_asha_optuna_hears_the_rung_values():
    space = parse_space(SPACE, source="test space")
    search = milestone_optuna_search_class()(space=space.optuna_define_by_run(), metric="val_ppl", mode="min",
                                             sampler=optuna.samplers.RandomSampler(seed=0), rungs=[20, 40, 80])
    search.suggest("t1")
    search.on_trial_result("t1", {"val_ppl": 40.0, "sparsity_pct": 48, "sparsity_pct_before": 0,
                                  "val_ppl_before": 30.0, "training_iteration": 1})
    search.on_trial_result("t1", {"val_ppl": 60.0, "sparsity_pct": 73, "sparsity_pct_before": 48,
                                  "val_ppl_before": 40.0, "training_iteration": 2})
    (trial,) = search._ot_study.trials
    assert sorted(trial.intermediate_values) == [20, 40]
    assert trial.intermediate_values[40] == pytest.approx(30.0 * (40 / 30) ** (40 / 48))


def test_projected_rung_metric_ranks_by_the_projection_in_asha_and_optuna():
    """--rung-metric projected: ASHA and TPE read val_ppl_projected (interpolated from its own
    previous point), not the trial's own ppl; at the target the two are the same number."""
    from types import SimpleNamespace

    from raysparse.search.milestones import PROJECTED
    from raysparse.search.searcher import _make_scheduler, decision_metric
    from raysparse.search.trainable import _trial_metrics

    settings = SearchSettings(grace_sparsity_pct=20, rung_metric="projected")
    assert decision_metric(settings) == PROJECTED == "val_ppl_projected"
    assert decision_metric(SearchSettings()) == "val_ppl"
    assert _make_searcher(parse_space(SPACE, source="test space"), settings).searcher.metric == PROJECTED
    trials = {name: SimpleNamespace(trial_id=name) for name in ("a", "b", "c")}

    def decisions(scheduler):
        for trial in trials.values():
            scheduler.on_trial_add(None, trial)
        out = []
        for name, own, projected in (("c", 33.0, 100.0), ("b", 32.0, 90.0), ("a", 31.0, 300.0)):
            record = {"iteration": 1, "target_sparsity": 0.3, "sparsity_before": 0.0, "sparsity": 0.3,
                      "ppl_before": 30.0, "ppl_after_train": own, "ppl_projected": projected,
                      "ppl_projected_before": None}
            out.append(scheduler.on_trial_result(None, trials[name], _trial_metrics(record)))
        return out

    # "a" has the best own ppl and by far the worst projection: stopped only when ranked by it.
    assert decisions(_make_scheduler(settings)) == ["CONTINUE", "CONTINUE", "STOP"]
    assert decisions(_make_scheduler(SearchSettings(grace_sparsity_pct=20))) == ["CONTINUE", "CONTINUE", "CONTINUE"]
    # At the target the projection is the trial's own value; the previous projection is the
    # point interpolation starts from.
    last = _trial_metrics({"iteration": 2, "target_sparsity": 0.8, "sparsity_before": 0.3, "sparsity": 0.8,
                           "ppl_before": 34.0, "ppl_after_train": 90.0, "ppl_projected_before": 100.0})
    assert last[PROJECTED] == last["val_ppl"] == 90.0 and last["val_ppl_projected_before"] == 100.0


def test_projected_rung_metric_needs_the_perplexity_objective():
    from raysparse.errors import ConfigError

    with pytest.raises(ConfigError, match="goes with --objective final_ppl, not ppl_vs_compute"):
        SearchSettings(rung_metric="projected", objective="ppl_vs_compute").validate()
