"""A search trial resumed from its checkpoint replays the reports of the iterations it had
finished (issue 17, item 5): the scheduler and the searcher see the same milestones, with
the same values, as from an uninterrupted run of the trial. Before, a search restored after
a driver kill started with empty ASHA rungs and the resumed trial's first milestones were
never reported, so later reports landed on the wrong rungs."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from raysparse.config import TrialConfig
from raysparse.trial.checkpoint import checkpoint_of
from raysparse.trial.runner import run_trial

pytestmark = pytest.mark.slow


class Interrupt(Exception):
    pass


def test_a_resumed_trial_reports_every_milestone_once_with_the_same_values(tiny_preset, tmp_path, monkeypatch):
    import ray
    from ray import tune

    from raysparse.search import trainable

    config = TrialConfig(model="tiny", method="magnitude", schedule="iterative", sparsity=0.6, prune_percentage=0.3,
                         eval_max_windows=2, report_test=False)

    def trial(name: str) -> TrialConfig:
        return TrialConfig(**{**config.to_dict(), "output": str(tmp_path / name),
                              "ray_train_storage": str(tmp_path / f"{name}-ray-train")})
    # The uninterrupted trial's reports, as the search sees them.
    straight: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: straight.append(metrics))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))
    trainable._run(trial("straight"), tmp_path / "straight", str(tmp_path / "storage-straight"))
    assert [r["sparsity_pct"] for r in straight[:-1]] == [30, 51, 60]  # 1-(1-0.3)^n, the last on the target

    # The same trial interrupted after its first iteration (its checkpoint is written before the report)...
    first = tmp_path / "first"

    def stop_after_first(record):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(trial("first"), reporter=stop_after_first)
    held = tmp_path / "tune-checkpoint"
    shutil.copytree(checkpoint_of(first, 1), held)
    # ...and resumed from that checkpoint, as Tune hands it to a restored trial.
    resumed: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: resumed.append(metrics))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(held)))
    trainable._run(trial("resumed"), tmp_path / "resumed", str(tmp_path / "storage-resumed"))

    assert [r["sparsity_pct"] for r in resumed] == [r["sparsity_pct"] for r in straight]
    assert [r.get("replayed", False) for r in resumed[:-1]] == [True, False, False]
    assert resumed[0]["resumed_after"] == 1 and resumed[0]["attempt"] == 2
    for before, after in zip(straight, resumed):
        assert after["val_ppl"] == pytest.approx(before["val_ppl"], rel=1e-5)


def test_asha_rungs_survive_a_driver_kill(tmp_path):
    """The rungs are read back by the restored scheduler: a trial reaching a milestone after
    the restore meets the cutoff the trials finished before the kill set, as it would have
    without the kill (Tune restores the searcher's state, not the scheduler's)."""
    import ray.cloudpickle as pickle  # as Tune pickles tuner.pkl

    from raysparse.search.searcher import _make_scheduler
    from raysparse.search.settings import SearchSettings

    def trial(name):
        return SimpleNamespace(trial_id=name)

    def report(scheduler, name, pct, ppl):
        return scheduler.on_trial_result(None, trial(name), {"sparsity_pct": pct, "val_ppl": ppl})

    settings = SearchSettings(grace_sparsity_pct=20)
    state = tmp_path / "asha_state.json"
    scheduler = _make_scheduler(settings, str(state))
    pickled = pickle.dumps(scheduler)  # what Tune keeps in tuner.pkl: the scheduler before the search ran
    for name in "ab":
        scheduler.on_trial_add(None, trial(name))
    assert report(scheduler, "a", 20, 11.0) == "CONTINUE" and report(scheduler, "b", 20, 10.0) == "CONTINUE"

    restored = pickle.loads(pickled)  # --resume after a driver kill
    for name in "abc":
        restored.on_trial_add(None, trial(name))
    uninterrupted = pickle.loads(pickle.dumps(scheduler))
    uninterrupted.on_trial_add(None, trial("c"))
    # c is worse than both at 20%: stopped, in the uninterrupted run and after the restore alike.
    assert report(uninterrupted, "c", 20, 12.0) == "STOP"
    assert report(restored, "c", 20, 12.0) == "STOP"
    # Without the rungs (Tune's own restore) c would have been the first at the rung and kept.
    plain = pickle.loads(pickled)
    plain._state_file = None
    plain.on_trial_add(None, trial("c"))
    assert report(plain, "c", 20, 12.0) == "CONTINUE"
    # A resumed trial's replayed report of a milestone it already reached changes nothing.
    assert report(restored, "a", 20, 11.0) == "CONTINUE"
