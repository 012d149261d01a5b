"""Cache keys by content, and pruning results shared by trials that differ only in recovery.

No Ray here: `--stats-cache DIR` (what launch/prune.py offers) reads and writes the same
entries a search's coordinator does, so these run the trial code path directly.
"""
import shutil

import pytest
import torch
from conftest import build_model, build_tokenizer

from raysparse.models.fingerprint import model_fingerprint
from raysparse.trial.runner import run_trial


def save_model(folder, seed: int):
    build_model("llama", seed=seed).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def trial(model_dir, text_files, tmp_path, **overrides):
    values = dict(model=str(model_dir), method="wanda", sparsity="0.5", nsamples=4, calib_data=str(text_files["calib"]),
                  eval_data=str(text_files["eval"]), val_data=str(text_files["val"]), seqlen=32, eval_seqlen=32,
                  eval_max_windows=4, report_test=False, stats_cache=str(tmp_path / "cache"))
    values.update(overrides)
    return run_trial(values)


def outcomes(summary, kind: str) -> list[str]:
    return [e["outcome"] for e in summary["stats_cache"] if e["kind"] == kind]


def test_two_models_at_one_path_get_different_entries_and_a_moved_model_keeps_its_own(text_files, tmp_path):
    path = save_model(tmp_path / "model", seed=0)
    first_print = model_fingerprint(str(path), memo_dir=tmp_path / "memo")
    first = trial(path, text_files, tmp_path).summary
    shutil.rmtree(path)
    save_model(path, seed=1)  # another model, same path
    assert model_fingerprint(str(path), memo_dir=tmp_path / "memo") != first_print
    second = trial(path, text_files, tmp_path).summary
    assert outcomes(first, "dense_ppl") == outcomes(second, "dense_ppl") == ["computed"]
    assert second["val"]["ppl_dense"] != first["val"]["ppl_dense"]
    moved = tmp_path / "moved"
    path.rename(moved)
    third = trial(moved, text_files, tmp_path).summary
    assert outcomes(third, "dense_ppl") == ["hit"] and outcomes(third, "prune_masks") == ["hit"]
    assert third["val"]["ppl_dense"] == second["val"]["ppl_dense"]
    assert third["stats_cache_by_kind"]["dense_ppl"]["hits"] == 1


def test_trials_differing_only_in_recovery_lr_prune_once_with_identical_masks(text_files, tmp_path):
    path = save_model(tmp_path / "model", seed=0)
    recovery = dict(recovery="masked", train_samples=8, max_steps=1, batch_size=4)
    first = trial(path, text_files, tmp_path, lr=1e-4, **recovery)
    second = trial(path, text_files, tmp_path, lr=1e-3, **recovery)
    assert outcomes(first.summary, "prune_masks") == ["computed"] and outcomes(second.summary, "prune_masks") == ["hit"]
    assert first.masks.keys() == second.masks.keys()
    assert all(torch.equal(first.masks[name], second.masks[name]) for name in first.masks)
    assert first.summary["val"]["ppl_pruned"] == second.summary["val"]["ppl_pruned"]
    other_seed = trial(path, text_files, tmp_path, lr=1e-3, seed=1, **recovery)  # other calibration windows
    assert outcomes(other_seed.summary, "prune_masks") == ["computed"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_served_pruning_result_gives_the_identical_model(method, text_files, tmp_path):
    """SparseGPT also updates the weights it keeps: those are served with the masks."""
    path = save_model(tmp_path / "model", seed=0)
    computed = trial(path, text_files, tmp_path, method=method)
    served = trial(path, text_files, tmp_path, method=method)
    assert outcomes(computed.summary, "prune_masks") == ["computed"] and outcomes(served.summary, "prune_masks") == ["hit"]
    ours, theirs = computed.loaded.model.state_dict(), served.loaded.model.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert computed.summary["val"]["ppl_pruned"] == served.summary["val"]["ppl_pruned"]
