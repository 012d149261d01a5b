"""The searcher (Optuna TPE / NSGA-II / random through OptunaSearch) and the ASHA scheduler."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raysparse.paths import write_json_atomic
from raysparse.search.milestones import FIDELITY_KEYS, PROJECTED, asha_rungs, crossed_rungs
from raysparse.search.settings import OBJECTIVES, SearchSettings
from raysparse.search.space import SearchSpace

REDUCTION_FACTOR = 2  # SearchSettings.reduction_factor's default (the recorded replays' setting)
MAX_PCT = 101  # above any sparsity_pct: ASHA must never cut a trial for "running out of time"


def milestone_optuna_search_class():
    """OptunaSearch that ranks trials at sparsity milestones, as ASHA does.

    Two departures from OptunaSearch, both needed for a fair search over schedules:
    - Intermediate values reach Optuna at step = the sparsity milestone, not at Tune's
      `training_iteration`: with ASHA, at the rungs ASHA compares (values interpolated to the
      rung, `milestones.crossed_rungs`), else at the report's own planned level. TPE ranks a
      PRUNED trial by its deepest step first, so with iteration steps a trial with a small
      prune percentage (many iterations) looked better just for being slow.
    - Tune reports an ASHA-stopped trial as complete with its partial value, which misleads
      TPE into treating a 55%-sparse perplexity as a final one: it is told PRUNED instead, or
      FAIL with `stopped="ignore"`. TPE ranks PRUNED trials below every finished one, so where
      the first rung does not rank the final result (asha_replay.py: the default space at
      20%), ASHA's near-random stops teach TPE noise; FAIL trials it leaves out.
    Both touch OptunaSearch's private `_ot_trials`/`_ot_study`/`_completed_trials` (pinned by
    a test against the installed Ray and Optuna).
    """
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class MilestoneOptunaSearch(OptunaSearch):
        def __init__(self, *args: Any, rungs: list[int] | None = None, stopped: str = "pruned",
                     fidelity: str = "sparsity", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._rungs = rungs
            self._fidelity = fidelity
            self._stopped_state = TrialState.FAIL if stopped == "ignore" else TrialState.PRUNED

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, list) or trial_id in self._completed_trials:
                return  # Optuna keeps no intermediate values for several objectives
            trial = self._ot_trials[trial_id]
            known = trial.storage.get_trial(trial._trial_id).intermediate_values
            time_attr = FIDELITY_KEYS[self._fidelity][0]
            points = (crossed_rungs(result, self.metric, self._rungs, self._fidelity) if self._rungs
                      else [(int(result[time_attr]), result[self.metric])])
            for step, value in points:
                if step not in known:
                    trial.report(value, step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and not error and not result.get("completed") and trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=self._stopped_state)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    return MilestoneOptunaSearch


def startup_trials(settings: SearchSettings) -> int:
    """Random trials before TPE models the results. Optuna's default (10) is more than a small
    search runs, and TPE's start-up draws are its own seeded RandomSampler's: with 8 trials
    TPE *was* random search, trial for trial."""
    if settings.startup_trials is not None:
        return settings.startup_trials
    return max(2, min(10, settings.num_samples // 3))


def make_sampler(space: SearchSpace, settings: SearchSettings):
    """The Optuna sampler a search uses (also run on a surrogate by tests/benchmarks/search_surrogate.py)."""
    import optuna

    metrics, _ = OBJECTIVES[settings.objective]
    if settings.searcher == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if settings.searcher == "qmc":
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=settings.seed)
    if len(metrics) > 1:
        return optuna.samplers.NSGAIISampler(seed=settings.seed)
    # group=True: conditional parameters (lora_r only when recovery is lora) are modelled
    # jointly within the subspace where they are active, not sampled independently.
    conditional = any(spec.when for spec in space.params.values())
    return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, group=conditional,
                                      n_startup_trials=startup_trials(settings))


def decision_metric(settings: SearchSettings) -> str | list[str]:
    """The report key the searcher and ASHA read: the objective's metric(s), or with
    --rung-metric projected the projected ppl, which equals val_ppl at the target itself."""
    metrics, _ = OBJECTIVES[settings.objective]
    if settings.rung_metric == "projected":
        return PROJECTED
    return metrics if len(metrics) > 1 else metrics[0]


def max_recovery_epochs(space: SearchSpace) -> int:
    """The most recovery epochs a trial of this space trains (per iteration)."""
    spec = space.params.get("epochs_per_iteration")
    if spec is None:
        return int(space.fixed.get("epochs_per_iteration", 1))
    return int(max(spec.choices) if spec.kind == "choice" else spec.high)


def asha_bounds(settings: SearchSettings, space: SearchSpace | None) -> tuple[int, int]:
    """(first rung, max_t) of ASHA for the search's fidelity.

    Epochs: max_t is one below the most epochs a trial trains, so no rung sits on a trial's
    last epoch, where a stop would cut it before its final report (and its summary).
    """
    if settings.fidelity == "epochs":
        if space is None:
            raise ValueError("ASHA on recovery epochs needs the search space (its epochs per iteration)")
        return settings.grace_epochs, max_recovery_epochs(space) - 1
    return settings.grace_sparsity_pct, MAX_PCT


def _make_searcher(space: SearchSpace, settings: SearchSettings):
    from ray.tune.search import ConcurrencyLimiter

    OptunaSearch = milestone_optuna_search_class()

    metrics, modes = OBJECTIVES[settings.objective]
    sampler = make_sampler(space, settings)
    asha = settings.early_stopping and len(metrics) == 1
    grace, max_t = asha_bounds(settings, space)
    searcher = OptunaSearch(
        space=space.optuna_define_by_run(), metric=decision_metric(settings),
        mode=modes if len(modes) > 1 else modes[0], sampler=sampler,
        rungs=asha_rungs(grace, settings.reduction_factor, max_t) if asha else None,
        stopped=settings.stopped_trials, fidelity=settings.fidelity,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)


def persistent_asha_class():
    """ASHA whose rungs survive a driver kill: kept in a JSON file beside the experiment.

    Tune saves the searcher's state with the experiment but not the scheduler's: a restored
    search started with empty rungs, so the trials finished before the kill no longer set
    the cutoffs and the same trial could be kept or stopped differently than in an
    uninterrupted run. The rungs are written after every change and read back the first
    time the restored scheduler is used (a repeated milestone of a trial is ignored by ASHA,
    so a resumed trial's replayed reports do not count twice).

    Each report is judged at the rungs it crossed, with its value interpolated to the rung
    (`milestones.crossed_rungs`), instead of Ray's rule of recording it at the highest rung
    not yet recorded, which compared a trial's later, sparser report against the others'
    values at a rung it had jumped past.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class PersistentASHA(ASHAScheduler):
        def __init__(self, state_file: str | None = None, fidelity: str = "sparsity", **kwargs: Any) -> None:
            super().__init__(time_attr=FIDELITY_KEYS[fidelity][0], **kwargs)
            self._state_file = state_file
            self._fidelity = fidelity
            self._loaded = False

        def _load(self) -> None:
            if self._loaded or self._state_file is None:
                return
            self._loaded = True
            try:
                saved = json.loads(Path(self._state_file).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return  # a new search, or no rung was reached before the kill
            for bracket, rungs in zip(self._brackets, saved.get("rungs", [])):
                for (_, recorded), kept in zip(bracket._rungs, rungs):
                    recorded.update(kept)
            self._num_stopped = int(saved.get("num_stopped", 0))

        def _save(self) -> None:
            if self._state_file is not None:
                write_json_atomic(Path(self._state_file), {
                    "rungs": [[recorded for _, recorded in bracket._rungs] for bracket in self._brackets],
                    "num_stopped": self._num_stopped})

        def on_trial_add(self, tune_controller, trial) -> None:
            self._load()
            super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            self._load()
            if self._time_attr not in result or self._metric not in result:
                return super().on_trial_result(tune_controller, trial, result)  # Ray's own error
            bracket = self._trial_info[trial.trial_id]
            rungs = {milestone: recorded for milestone, recorded in bracket._rungs}
            action = TrialScheduler.CONTINUE
            for milestone, value in crossed_rungs(result, self._metric, sorted(rungs), self._fidelity):
                recorded = rungs[milestone]
                if trial.trial_id in recorded:
                    continue  # a resumed trial's replayed report
                cutoff = bracket.cutoff(recorded)
                recorded[trial.trial_id] = self._metric_op * value
                if cutoff is not None and self._metric_op * value < cutoff:
                    action = TrialScheduler.STOP
                    self._num_stopped += 1
                    break
            self._save()
            return action

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            self._load()
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

    return PersistentASHA


def _make_scheduler(settings: SearchSettings, state_file: str | None = None, space: SearchSpace | None = None):
    from ray.tune.schedulers import FIFOScheduler

    metrics, modes = OBJECTIVES[settings.objective]
    if not settings.early_stopping or len(metrics) > 1:
        return FIFOScheduler()
    grace, max_t = asha_bounds(settings, space)
    return persistent_asha_class()(state_file=state_file, fidelity=settings.fidelity,
                                   metric=decision_metric(settings), mode=modes[0], max_t=max_t,
                                   grace_period=grace, reduction_factor=settings.reduction_factor)
