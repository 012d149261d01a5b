"""The searcher (Optuna TPE / NSGA-II / random through OptunaSearch) and the ASHA scheduler."""
from __future__ import annotations

from raysparse.search.settings import OBJECTIVES, SearchSettings
from raysparse.search.space import SearchSpace


def milestone_optuna_search_class():
    """OptunaSearch that tells Optuna a trial stopped early at a milestone was PRUNED.

    Tune reports an ASHA-stopped trial as complete with its partial value, which misleads
    TPE into treating a 55%-sparse perplexity as a final one. This override touches
    OptunaSearch's private `_ot_trials`/`_ot_study`/`_completed_trials` (pinned by a test).
    """
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class MilestoneOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and not error and not result.get("completed") and trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    return MilestoneOptunaSearch


def _make_searcher(space: SearchSpace, settings: SearchSettings):
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    OptunaSearch = milestone_optuna_search_class()

    metrics, modes = OBJECTIVES[settings.objective]
    if settings.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    elif len(metrics) > 1:
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    searcher = OptunaSearch(
        space=space.optuna_define_by_run(), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], sampler=sampler,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)


def _make_scheduler(settings: SearchSettings):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metrics, modes = OBJECTIVES[settings.objective]
    if not settings.early_stopping or len(metrics) > 1:
        return FIFOScheduler()
    # max_t above any sparsity_pct: ASHA must never cut a trial for "running out of time".
    return ASHAScheduler(time_attr="sparsity_pct", metric=metrics[0], mode=modes[0], max_t=101,
                         grace_period=settings.grace_sparsity_pct, reduction_factor=2)
