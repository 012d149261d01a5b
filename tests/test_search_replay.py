"""A search trial resumed from its checkpoint replays the reports of the iterations it had
finished (issue 17, item 5): the scheduler and the searcher see the same milestones, with
the same values, as from an uninterrupted run of the trial. Before, a search restored after
a driver kill started with empty ASHA rungs and the resumed trial's first milestones were
never reported, so later reports landed on the wrong rungs."""
from __future__ import annotations

import shutil
from pathlib import Path
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
