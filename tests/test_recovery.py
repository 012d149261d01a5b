"""Masked fine-tuning, LoRA with a masked merge, iterative trials, resume, failures."""
import json
import math

import pytest
import torch
from conftest import build_model

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.models.adapters import get_adapter
from raysparse.prune import prune_magnitude
from raysparse.recover.loop import TrainingDiverged, TrainSettings, fit
from raysparse.recover.lora import LoraSettings, train_lora
from raysparse.recover.masked import train_masked
from raysparse.sparsity.masks import measure_sparsity, verify_masks
from raysparse.sparsity.pattern import parse_sparsity
from raysparse.trial.runner import TrialFailed, run_trial

WINDOWS = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(5))


def pruned_llama(sparsity=0.5):
    model = build_model("llama")
    masks = prune_magnitude(get_adapter(model), parse_sparsity(sparsity))
    return model, masks


def test_masked_training_changes_weights_but_never_a_pruned_one():
    model, masks = pruned_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_masked(model, masks, WINDOWS, TrainSettings(lr=1e-2, epochs=2, batch_size=4, keep_best=False),
                          evaluate=None, progress=False)
    verify_masks(model, masks)
    assert measure_sparsity(get_adapter(model)).overall == pytest.approx(0.5, abs=1e-6)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
    assert len(result.epochs) == 2 and result.steps == 8
    assert result.epochs[1].avg_loss < result.epochs[0].avg_loss


def test_lora_masked_merge_keeps_sparsity_where_a_plain_merge_would_not(tmp_path):
    model, masks = pruned_llama()
    seen = []
    outcome = train_lora(model, masks, WINDOWS, TrainSettings(lr=1e-2, epochs=1, batch_size=4),
                         LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                         evaluate=lambda m: seen.append(type(m).__name__) or 10.0,
                         adapter_dir=tmp_path / "adapter", progress=False, baseline_ppl=12.0)
    verify_masks(outcome.model, masks)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert outcome.ppl_with_adapter == 10.0 and outcome.ppl_masked_merge == 10.0
    assert seen == ["PeftModelForCausalLM", "LlamaForCausalLM"]  # adapter attached, then merged
    # The low-rank update is dense: an unmasked merge would have filled pruned positions.
    from peft import PeftModel

    plain = PeftModel.from_pretrained(pruned_llama()[0], tmp_path / "adapter").merge_and_unload()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert int((plain.get_parameter(q)[~masks[q]] != 0).sum()) > 0


def test_lora_target_that_does_not_exist_names_the_available_layers():
    model, masks = pruned_llama()
    with pytest.raises(ConfigError, match="query_key_value not found.*available linear layers: .*q_proj"):
        train_lora(model, masks, WINDOWS, TrainSettings(), LoraSettings(target_modules=["query_key_value"]), None)


def test_nan_loss_stops_training():
    model, masks = pruned_llama()
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        fit(model, list(model.parameters()), WINDOWS, TrainSettings(lr=1e30, epochs=3, batch_size=4), None,
            progress=False)


def small_trial(model_dir, text_files, tmp_path, **overrides):
    values = dict(model=str(model_dir), method="magnitude", sparsity="0.6", schedule="iterative",
                  prune_percentage=0.3, recovery="masked", lr=1e-3, batch_size=4, train_samples=8,
                  epochs_per_iteration=1, calib_data=str(text_files["calib"]), eval_data=str(text_files["eval"]), val_data=str(text_files["val"]),
                  train_data=str(text_files["calib"]), seqlen=32, eval_seqlen=32, eval_max_windows=8,
                  output=str(tmp_path / "trial"))
    values.update(overrides)
    return TrialConfig(**values)


def test_iterative_trial_reports_every_iteration_and_keeps_exact_sparsity(saved_model_dir, text_files, tmp_path):
    records = []
    result = run_trial(small_trial(saved_model_dir(), text_files, tmp_path), reporter=records.append)
    summary = result.summary
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert [round(r["target_sparsity"], 4) for r in records] == [0.3, 0.51, 0.6]
    for record in records:
        assert record["sparsity"] == pytest.approx(record["target_sparsity"], abs=1 / 64)
        for key in ("ppl_after_prune", "ppl_after_train", "train_loss", "steps", "time_s", "peak_memory_mb", "epochs"):
            assert record[key] is not None
    assert summary["iterations"] == 3 and summary["history"] == json.loads(json.dumps(records))
    assert summary["sparsity_measured"] == pytest.approx(0.6, abs=1 / 64)
    verify_masks(result.loaded.model, result.masks)
    assert not list((tmp_path / "trial").glob("*checkpoint*"))  # finished: only the summary stays
    assert json.loads((tmp_path / "trial" / "summary.json").read_text())["status"] == "completed"


class Interrupt(Exception):
    pass


def test_resume_redoes_no_finished_iteration(saved_model_dir, text_files, tmp_path):
    model_dir = saved_model_dir()
    uninterrupted = run_trial(small_trial(model_dir, text_files, tmp_path, output=str(tmp_path / "clean"))).summary

    def stop_after_two(record):
        if record["iteration"] == 2:
            raise Interrupt

    config = small_trial(model_dir, text_files, tmp_path)
    with pytest.raises(Interrupt):
        run_trial(config, reporter=stop_after_two)
    assert [p.name for p in (tmp_path / "trial").glob("*checkpoint*")] == ["checkpoint-000002"]
    assert not (tmp_path / "trial" / "summary.json").exists()
    resumed_records = []
    resumed = run_trial(config, reporter=resumed_records.append).summary
    assert [r["iteration"] for r in resumed_records] == [3]  # 1 and 2 came from the checkpoint
    assert [h["iteration"] for h in resumed["history"]] == [1, 2, 3]
    assert [(a["attempt"], a["resumed_after"]) for a in resumed["attempts"]] == [(1, 0), (2, 2)]
    # Steps add up over both starts: the resumed run cost what the uninterrupted one did.
    assert resumed["train_steps_total"] == uninterrupted["train_steps_total"] == sum(
        h["steps"] for h in resumed["history"]) > 0
    assert resumed["wall_s_total"] > resumed_records[0]["time_s"]
    assert resumed["ppl_final"] == pytest.approx(uninterrupted["ppl_final"], rel=1e-4)


def test_resume_refuses_a_checkpoint_of_another_trial(saved_model_dir, text_files, tmp_path):
    model_dir = saved_model_dir()

    def stop(record):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(small_trial(model_dir, text_files, tmp_path), reporter=stop)
    with pytest.raises(ConfigError, match="different trial .*lr.*--no-resume"):
        run_trial(small_trial(model_dir, text_files, tmp_path, lr=5e-4))


def test_nan_loss_fails_the_trial_and_keeps_finished_iterations(saved_model_dir, text_files, tmp_path, monkeypatch):
    import raysparse.trial.recovery as trial_module

    real = trial_module._train_settings
    calls = []

    def diverge_on_second_iteration(config, device):  # fault injection: a learning rate that explodes
        calls.append(1)
        settings = real(config, device)
        if len(calls) == 2:
            settings.lr = 1e30
        return settings

    monkeypatch.setattr(trial_module, "_train_settings", diverge_on_second_iteration)
    with pytest.raises(TrialFailed, match="failed at iteration 2: loss became nan.*1 finished iteration"):
        run_trial(small_trial(saved_model_dir(), text_files, tmp_path))
    summary = json.loads((tmp_path / "trial" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_iteration"] == 2
    assert len(summary["history"]) == 1 and math.isfinite(summary["history"][0]["ppl_after_train"])
    assert not (tmp_path / "trial" / "model").exists()


def test_target_at_or_below_current_sparsity_is_refused(saved_model_dir, text_files, tmp_path):
    first = run_trial(small_trial(saved_model_dir(), text_files, tmp_path, schedule="oneshot", recovery="none",
                                  save=True)).summary
    with pytest.raises(ConfigError, match="not above the model.s current sparsity 0.59"):
        run_trial(small_trial(first["saved_model"], text_files, tmp_path, sparsity="0.5", output=None))


@pytest.mark.parametrize("changes,fragment", [
    ({"prune_percentage": 1.5}, "prune_percentage 1.5 is outside (0, 1)"),
    ({"recovery": "lora", "lora_target_modules": ""}, "lora_target_modules is empty"),
    ({"recovery": "finetune"}, "unknown recovery"),
    ({"sparsity": "2:4"}, "iterative schedule needs a fractional sparsity"),
    ({"schedule": "oneshot", "project_to_target": True}, "project_to_target measures an iterative trial"),
])
def test_bad_trial_settings(changes, fragment, tmp_path):
    values = dict(schedule="iterative", recovery="masked")
    values.update(changes)
    with pytest.raises(ConfigError) as info:
        TrialConfig(**values).validate()
    assert fragment in str(info.value)


def test_batch_size_aware_rule():
    config = TrialConfig(recovery="masked", batch_scaled=True, lr=5e-6, batch_size=4, total_samples=10000)
    assert config.effective_lr() == pytest.approx(1e-5)
    assert config.effective_max_steps() == 2500


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_projection_to_the_target_measures_a_pruned_copy_and_leaves_the_trial_alone(
        saved_model_dir, text_files, tmp_path, method):
    """--project-to-target: below the target each record carries the validation ppl of the
    current model pruned one-shot to the target; the trial itself runs exactly as without it."""
    model_dir = saved_model_dir()
    plain = run_trial(small_trial(model_dir, text_files, tmp_path / "plain", method=method))
    projected_records = []
    projected = run_trial(small_trial(model_dir, text_files, tmp_path / "projected", method=method,
                                      project_to_target=True), reporter=projected_records.append)
    history, plain_history = projected.summary["history"], plain.summary["history"]
    assert len(history) == len(plain_history) >= 2
    for record, same in zip(history, plain_history):  # the projection changes nothing the trial does
        assert record["ppl_after_train"] == pytest.approx(same["ppl_after_train"], rel=1e-6)
        assert record["sparsity"] == pytest.approx(same["sparsity"], abs=1e-9)
    assert all("ppl_projected" in r for r in history[:-1]) and "ppl_projected" not in history[-1]
    assert history[0]["ppl_projected_before"] is None
    assert [r["ppl_projected_before"] for r in history[1:]] == [r["ppl_projected"] for r in history[:-1]]
    assert "ppl_projected" not in plain_history[0] and "ppl_projected_before" not in plain_history[0]
    # Without recovery, a two-step schedule's projection after step 1 is exactly what step 2
    # does (prune the step-1 model to the target): a projection at the wrong level, from the
    # wrong weights or with a lost mask would differ.
    two = run_trial(small_trial(model_dir, text_files, tmp_path / "two", method=method, recovery="none",
                                sparsity="0.75", prune_percentage=0.5, project_to_target=True)).summary["history"]
    assert [r["target_sparsity"] for r in two] == [0.5, 0.75]
    assert two[0]["ppl_projected"] == pytest.approx(two[1]["ppl_after_train"], rel=1e-5)
