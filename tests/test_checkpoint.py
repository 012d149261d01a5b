"""The trial checkpoint: versioned folders replaced so one always exists, a trial killed in the
middle of a save resumes from the previous one, and a search trial's start (Tune checkpoint,
finished result on storage) is found."""
import json
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model
from test_recovery import small_trial

import raysparse.trial.checkpoint as checkpoint_module
from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.search.resume import finished_on_storage, last_attempt, restore_into
from raysparse.trial.checkpoint import (
    checkpoint_of,
    checkpoints,
    latest_checkpoint,
    load_trial_state,
    new_staging,
    restore_checkpoint,
    save_checkpoint,
)
from raysparse.trial.runner import run_trial
from raysparse.trial.state import TrialState


def loaded_model():
    model = build_model("llama")
    return SimpleNamespace(model=model, tokenizer=None, adapter=None, path="")


def state(completed, **config):
    return TrialState(config=TrialConfig(model="m", lr=0.001, **config).to_dict(), levels=[0.2, 0.4, 0.6], ppl_dense=10.0,
                      start_sparsity=0.0, completed=completed)


def masks_of(model):
    return {"model.layers.0.mlp.up_proj.weight": torch.ones_like(model.model.layers[0].mlp.up_proj.weight).bool()}


def test_a_save_replaces_the_previous_version_only_after_it_is_in_place(tmp_path):
    loaded = loaded_model()
    masks = masks_of(loaded.model)
    first = save_checkpoint(tmp_path, state(1), loaded, masks)
    assert first.name == "checkpoint-000001" and checkpoints(tmp_path) == [first]
    renamed = []
    real = checkpoint_module._rename_into_place

    def watch(staging, final):
        renamed.append([p.name for p in checkpoints(tmp_path)])  # what exists at the atomic step
        real(staging, final)

    checkpoint_module._rename_into_place = watch
    try:
        second = save_checkpoint(tmp_path, state(2), loaded, masks)
    finally:
        checkpoint_module._rename_into_place = real
    assert renamed == [["checkpoint-000001"]]
    assert checkpoints(tmp_path) == [second] and checkpoint_of(tmp_path, 2) == second
    assert checkpoint_of(tmp_path, 1) is None and not list(tmp_path.glob(".checkpoint-staging-*"))


def test_the_loader_takes_the_newest_complete_version_and_ignores_staging(tmp_path):
    loaded = loaded_model()
    masks = masks_of(loaded.model)
    newer = save_checkpoint(tmp_path, state(2), loaded, masks)
    # A crash after the rename but before the older version was removed: both are complete.
    older = tmp_path / "checkpoint-000001"
    shutil.copytree(newer, older)
    (older / "state.json").write_text(json.dumps({**json.loads((newer / "state.json").read_text()), "completed": 1}))
    # A crash while writing: a staging folder without its state, never read.
    (new_staging(tmp_path) / "model.safetensors").write_bytes(b"partial")
    config = TrialConfig(model="m", lr=0.001)
    assert latest_checkpoint(tmp_path) == newer
    assert load_trial_state(tmp_path, config).completed == 2
    assert set(restore_checkpoint(tmp_path, loaded)) == set(masks)
    with pytest.raises(ConfigError, match="different trial .*settings differ: lr.*--no-resume"):
        load_trial_state(tmp_path, TrialConfig(model="m", lr=0.002))
    assert load_trial_state(tmp_path, TrialConfig(model="m", lr=0.001, resume=False)) is None


CRASH_IN_SAVE = """
import json, os, signal, sys
import raysparse.trial.checkpoint as checkpoint
from raysparse.config import TrialConfig
from raysparse.trial.runner import run_trial

real = checkpoint._rename_into_place

def crash_before_renaming_the_second(staging, final):
    if final.name == "checkpoint-000002":  # written in full under its staging name, not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
    real(staging, final)

checkpoint._rename_into_place = crash_before_renaming_the_second
run_trial(TrialConfig(**json.loads(sys.argv[1])))
"""


def test_a_trial_killed_between_writing_and_renaming_resumes_from_the_previous_checkpoint(
        saved_model_dir, text_files, tmp_path):
    model_dir = saved_model_dir()
    uninterrupted = run_trial(small_trial(model_dir, text_files, tmp_path, output=str(tmp_path / "clean"))).summary
    config = small_trial(model_dir, text_files, tmp_path)
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, json.dumps(config.to_dict())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    output = tmp_path / "trial"
    assert [p.name for p in checkpoints(output)] == ["checkpoint-000001"]
    (staging,) = output.glob(".checkpoint-staging-*")
    assert json.loads((staging / "state.json").read_text())["completed"] == 2  # complete, but never renamed

    records = []
    resumed = run_trial(config, reporter=records.append).summary
    assert [r["iteration"] for r in records] == [2, 3]  # iteration 1 came from the checkpoint
    assert [h["iteration"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["ppl_final"] == pytest.approx(uninterrupted["ppl_final"], rel=1e-4)
    assert [(a["attempt"], a["resumed_after"]) for a in resumed["attempts"]] == [(1, 0), (2, 1)]
    assert resumed["train_steps_total"] == uninterrupted["train_steps_total"]
    assert not list(output.glob("*checkpoint*"))  # finished: checkpoints and staging are gone


def test_a_finished_result_on_storage_is_found_only_for_the_same_settings(tmp_path):
    config = TrialConfig(model="tiny", lr=0.001, output="/local/elsewhere")
    trial = tmp_path / "exp" / "trial_1"
    (trial / "checkpoint_000000").mkdir(parents=True)
    (trial / "checkpoint_000000" / "state.json").write_text("{}")
    assert finished_on_storage(str(trial), config) is None  # iteration checkpoints only
    summary = {"status": "completed", "history": [{"iteration": 1}],
               "config": dict(config.to_dict(), output="/node-a/trial"),
               "attempts": [{"attempt": 1, "node_id": "a", "resumed_after": 0},
                            {"attempt": 2, "node_id": "b", "resumed_after": 3}]}
    (trial / "checkpoint_000001").mkdir()
    (trial / "checkpoint_000001" / "summary.json").write_text(json.dumps(summary))
    for where in (str(trial), trial.as_uri()):  # a folder, or a URI (the same code path as s3://)
        assert finished_on_storage(where, config) == summary
    assert finished_on_storage(str(trial), TrialConfig(model="tiny", lr=0.002)) is None
    assert finished_on_storage(str(tmp_path / "missing"), config) is None
    assert last_attempt(summary) == {"attempt": 2, "node_id": "b", "resumed_after": 3}


def test_a_tune_checkpoint_is_installed_as_the_newest_version(tmp_path):
    from ray.tune import Checkpoint

    loaded = loaded_model()
    tune_copy = save_checkpoint(tmp_path / "storage", state(2), loaded, masks_of(loaded.model))
    output = tmp_path / "node-local"
    restored = restore_into(Checkpoint.from_directory(str(tune_copy)), output)
    assert restored.completed == 2 and [p.name for p in checkpoints(output)] == ["checkpoint-000002"]
    assert restore_into(None, output) is None
    assert restore_into(Checkpoint.from_directory(str(tmp_path / "deleted")), output) is None
    assert not list(output.glob(".checkpoint-staging-*"))


def test_a_checkpoint_of_the_old_layout_is_resumed_and_then_replaced(tmp_path):
    loaded = loaded_model()
    masks = masks_of(loaded.model)
    save_checkpoint(tmp_path, state(1), loaded, masks).rename(tmp_path / "checkpoint")  # as the old writer left it
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert load_trial_state(tmp_path, TrialConfig(model="m", lr=0.001)).completed == 1
    save_checkpoint(tmp_path, state(2), loaded, masks)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000002"]
