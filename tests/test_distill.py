"""Recovery by distillation from the dense model: the losses, the trial, the bad inputs."""
import copy
import json

import pytest
import torch
from conftest import build_model, build_tokenizer
from test_recovery import WINDOWS, pruned_llama, small_trial

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError, ModelError
from raysparse.models.adapters import get_adapter
from raysparse.prune import prune_magnitude
from raysparse.recover.distill import (
    DistillSettings,
    TeacherCost,
    TeacherOutputCache,
    distillation_loss,
    feature_loss,
    logit_kl,
    select_layers,
)
from raysparse.recover.loop import TrainingDiverged, TrainSettings
from raysparse.recover.masked import train_masked
from raysparse.sparsity.masks import measure_sparsity, verify_masks
from raysparse.sparsity.pattern import parse_sparsity
from raysparse.trial.runner import run_trial

BATCH = WINDOWS[:4]


def loss_of(student, teacher, mode="squarehead", layers=None, weight=1.0, temperature=2.0):
    settings = DistillSettings(mode, weight, temperature, layers)
    student_layers = list(get_adapter(student).decoder_layers())
    loss_fn = distillation_loss(teacher, settings, lambda _m: student_layers, list(get_adapter(teacher).decoder_layers()))
    with torch.no_grad():
        return loss_fn(student, BATCH)


def test_the_distillation_loss_is_zero_when_the_student_is_the_teacher():
    model = build_model("llama")
    total, parts = loss_of(model, copy.deepcopy(model))
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6) and parts["feature"] == pytest.approx(0.0, abs=1e-6)
    assert float(total) == pytest.approx(0.0, abs=1e-6)  # weight 1: pure distillation
    logits = torch.randn(2, 5, 11)
    assert float(logit_kl(logits, logits, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_kl(logits, torch.randn(2, 5, 11))) > 0


def test_the_feature_loss_sees_only_the_layers_named():
    teacher = build_model("llama", layers=3)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # change what layer 2 (the last) outputs; layers 0 and 1 are untouched
        student.model.layers[2].mlp.down_proj.weight.mul_(3.0)
    assert loss_of(student, teacher, layers=(0, 1))[1]["feature"] == pytest.approx(0.0, abs=1e-6)
    assert loss_of(student, teacher, layers=(-1,))[1]["feature"] > 1e-3
    assert select_layers(3, None) == [0, 1, 2] and select_layers(3, (-1, 0)) == [0, 2]
    with pytest.raises(ValueError, match="outside 0..2"):
        select_layers(3, (3,))
    # Normalised per layer: scaling both sides alike changes nothing.
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert float(feature_loss([a], [b])) == pytest.approx(float(feature_loss([10 * a], [10 * b])), rel=1e-5)


def test_the_weight_mixes_next_token_and_distillation_losses():
    model = build_model("llama")
    teacher = build_model("llama", seed=1)
    _, parts = loss_of(model, teacher, mode="logits", weight=0.25)
    total, _ = loss_of(model, teacher, mode="logits", weight=0.25)
    assert float(total) == pytest.approx(0.75 * parts["next_token"] + 0.25 * parts["kl"], rel=1e-5)
    assert "feature" not in parts


def test_masked_distillation_moves_the_student_to_the_teacher_and_keeps_the_masks():
    teacher = build_model("llama")
    with torch.no_grad():  # peaked next-token distributions, so there is something to learn from
        teacher.lm_head.weight.mul_(30.0)
    model = copy.deepcopy(teacher)
    masks = prune_magnitude(get_adapter(model), parse_sparsity(0.5))
    cost = TeacherCost()
    layers = list(get_adapter(model).decoder_layers())
    loss_fn = distillation_loss(teacher, DistillSettings("squarehead", 1.0, 1.0), lambda _m: layers,
                                list(get_adapter(teacher).decoder_layers()), cost)
    with torch.no_grad():
        kl_before = loss_fn(model, WINDOWS)[1]["kl"]
    result = train_masked(model, masks, WINDOWS, TrainSettings(lr=1e-4, epochs=3, batch_size=4, keep_best=False),
                          evaluate=None, progress=False, loss_fn=loss_fn)
    verify_masks(model, masks)
    assert measure_sparsity(get_adapter(model)).overall == pytest.approx(0.5, abs=1e-6)
    assert set(result.epochs[0].loss_parts) == {"next_token", "kl", "feature"}
    assert result.epochs[-1].loss_parts["kl"] < result.epochs[0].loss_parts["kl"]
    with torch.no_grad():
        assert loss_fn(model, WINDOWS)[1]["kl"] < 0.5 * kl_before
    assert cost.forwards == result.steps + 2 and cost.seconds > 0  # + the two measurements above
    assert all(not p.requires_grad for p in teacher.parameters())


def test_a_nan_in_the_teacher_stops_training_with_a_clear_error():
    teacher = build_model("llama")
    with torch.no_grad():
        teacher.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    model, masks = pruned_llama()
    layers = list(get_adapter(model).decoder_layers())
    loss_fn = distillation_loss(teacher, DistillSettings("logits"), lambda _m: layers,
                                list(get_adapter(teacher).decoder_layers()))
    with pytest.raises(TrainingDiverged, match="the teacher's output holds NaN"):
        train_masked(model, masks, WINDOWS, TrainSettings(lr=1e-3, epochs=1, batch_size=4), evaluate=None,
                     progress=False, loss_fn=loss_fn)


@pytest.mark.parametrize("recovery", ["masked", "lora"])
def test_an_iterative_trial_distils_from_the_dense_model(recovery, saved_model_dir, text_files, tmp_path):
    config = small_trial(saved_model_dir(), text_files, tmp_path, recovery=recovery, distill="squarehead",
                         distill_weight=0.5, distill_temperature=2.0, distill_layers="0,-1")
    result = run_trial(config)
    summary = result.summary
    assert summary["sparsity_measured"] == pytest.approx(0.6, abs=1 / 64)
    verify_masks(result.loaded.model, result.masks)
    first, *later = summary["history"]
    for record in summary["history"]:
        distill = record["distill"]
        assert distill["mode"] == "squarehead" and distill["teacher_forwards"] + distill["teacher_reused"] == record["steps"]
        assert set(record["epochs"][0]["loss_parts"]) == {"next_token", "kl", "feature"}
        assert distill["teacher_outputs"].startswith("cached per window")
    # 8 windows in batches of 4: the teacher runs on each window once, in the first iteration.
    assert first["distill"]["teacher_forwards"] == 2 and later
    assert all(r["distill"]["teacher_forwards"] == 0 and r["distill"]["teacher_reused"] == 2 for r in later)
    assert "load_teacher" in summary["timings_s"]
    assert json.loads((tmp_path / "trial" / "summary.json").read_text())["config"]["distill"] == "squarehead"


def test_cached_teacher_outputs_give_the_same_loss_and_skip_the_teacher():
    teacher = build_model("llama")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    settings = DistillSettings("squarehead", 0.5, 2.0, None)
    student_layers, teacher_layers = (list(get_adapter(m).decoder_layers()) for m in (student, teacher))

    def loss(cache, batch):
        cost = TeacherCost()
        fn = distillation_loss(teacher, settings, lambda _m: student_layers, teacher_layers, cost, cache)
        with torch.no_grad():
            total, parts = fn(student, batch)
        return float(total), parts, cost

    plain = loss(None, BATCH.flip(0))
    cache = TeacherOutputCache(windows=4, budget_bytes=2**30)
    loss(cache, BATCH)  # fills the cache: one forward
    total, parts, cost = loss(cache, BATCH.flip(0))  # the same windows, another order: no forward
    assert cost.forwards == 0 and cost.reused == 1
    assert total == pytest.approx(plain[0], rel=1e-6) and parts == pytest.approx(plain[1], rel=1e-6)
    assert cache.describe(cost).startswith("cached per window")
    assert loss(cache, WINDOWS[4:8])[2].forwards == 1  # a window not seen yet runs the teacher

    tight = TeacherOutputCache(windows=16, budget_bytes=1024)  # a window's logits alone are larger
    loss(tight, BATCH)
    _, _, cost = loss(tight, BATCH)
    assert cost.forwards == 1 and cost.reused == 0 and not tight.enabled
    assert "recomputed every step: caching 16 windows needs" in tight.describe(cost)
    assert "--distill-cache-mb 0" in TeacherOutputCache(4, 0).describe(cost)


def test_bad_distillation_settings_are_one_line_errors(saved_model_dir, text_files, tmp_path):
    with pytest.raises(ConfigError, match="needs a recovery"):
        TrialConfig(distill="logits").validate()
    with pytest.raises(ConfigError, match="comma-separated layer indices"):
        TrialConfig(distill="squarehead", recovery="masked", distill_layers="0,x").validate()
    with pytest.raises(ConfigError, match="distill_weight"):
        TrialConfig(distill="logits", recovery="masked", distill_weight=1.5).validate()


def test_a_teacher_with_another_tokenizer_is_refused_before_pruning(saved_model_dir, text_files, tmp_path):
    other = tmp_path / "other-teacher"
    build_model("llama", vocab_size=280).save_pretrained(other)
    build_tokenizer(vocab_size=280).save_pretrained(other)
    config = small_trial(saved_model_dir(), text_files, tmp_path, distill="logits", teacher=str(other))
    with pytest.raises(ModelError, match="another tokenizer than the model"):
        run_trial(config)
    assert not (tmp_path / "trial").exists()  # refused before anything was written
