"""Non-uniform per-layer sparsity from layer importance, inside a real trial."""
import json

import pytest

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.trial.runner import run_trial


def config(model_dir, text_files, tmp_path, **overrides):
    values = dict(model=str(model_dir), method="wanda", sparsity="0.5", pruning_strategy="inverse", alpha=2.0,
                  min_pruning_rate=0.2, max_pruning_rate=0.8, importance_samples=4, nsamples=4,
                  calib_data=str(text_files["calib"]), eval_data=str(text_files["eval"]), val_data=str(text_files["val"]), seqlen=32,
                  eval_seqlen=32, eval_max_windows=4, output=str(tmp_path / "out"))
    values.update(overrides)
    return TrialConfig(**values)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_inverse_allocation_gives_layers_different_ratios_and_meets_the_target(
        method, saved_model_dir, text_files, tmp_path):

    model_dir = saved_model_dir()
    summary = run_trial(config(model_dir, text_files, tmp_path, method=method)).summary
    ratios = summary["history"][-1]["layer_ratios"]
    scores = summary["layer_importance"]["scores"]
    assert len(ratios) == len(scores) == 2
    assert ratios[scores.index(max(scores))] < ratios[scores.index(min(scores))]  # important layer pruned less
    assert summary["sparsity_measured"] == pytest.approx(0.5, abs=2 / 64)
    for layer, ratio in enumerate(ratios):
        assert summary["per_layer"][str(layer)] == pytest.approx(ratio, abs=2 / 64)
    saved = json.loads((tmp_path / "out" / "layer_importance.json").read_text())
    assert saved["scores"] == scores and saved["method"] == "removal"


def test_importance_file_is_reused_and_checked(saved_model_dir, text_files, tmp_path):
    model_dir = saved_model_dir()
    run_trial(config(model_dir, text_files, tmp_path))
    path = tmp_path / "out" / "layer_importance.json"
    reused = run_trial(config(model_dir, text_files, tmp_path, importance_config=str(path),
                              output=str(tmp_path / "second"))).summary
    assert reused["layer_importance"]["scores"] == json.loads(path.read_text())["scores"]
    assert "importance" not in reused["timings_s"] or reused["timings_s"]["importance"] < 1
    other = json.loads(path.read_text())
    other["num_layers"], other["scores"] = 3, other["scores"] + [0.1]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="3 layers"):
        run_trial(config(model_dir, text_files, tmp_path, importance_config=str(bad), output=None))


def test_importance_is_computed_once_through_the_stats_cache(saved_model_dir, text_files, tmp_path):
    model_dir = saved_model_dir()
    cache = str(tmp_path / "stats")
    first = run_trial(config(model_dir, text_files, tmp_path, stats_cache=cache, output=None)).summary
    second = run_trial(config(model_dir, text_files, tmp_path, stats_cache=cache, output=None, alpha=1.0)).summary
    assert [e["outcome"] for e in first["stats_cache"] if e["kind"] == "layer_importance"] == ["computed"]
    assert [e["outcome"] for e in second["stats_cache"] if e["kind"] == "layer_importance"] == ["hit"]


@pytest.mark.parametrize("changes,fragment", [
    ({"pruning_strategy": "random"}, "unknown pruning_strategy"),
    ({"alpha": -1.0}, "alpha -1.0 must be >= 0"),
    ({"min_pruning_rate": 0.6, "max_pruning_rate": 0.4}, "min_pruning_rate"),
    ({"sparsity": "2:4"}, "N:M patterns are uniform"),
    ({"method": "magnitude", "magnitude_scope": "global"}, "global magnitude threshold"),
])
def test_bad_allocation_settings(changes, fragment):
    values = dict(pruning_strategy="inverse")
    values.update(changes)
    with pytest.raises(ConfigError) as info:
        TrialConfig(**values).validate()
    assert fragment in str(info.value)
