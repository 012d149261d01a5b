"""Layer importance: an identity layer scores ~0, others do not; JSON cache round-trip and checks."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model

from raysparse.errors import ConfigError
from raysparse.models.adapters import get_adapter
from raysparse.sparsity.importance import LayerImportance, activation_importance, compute_importance, removal_importance

# Output projections (weight and bias) whose zeroing turns a pre-norm residual layer into x -> x.
OUTPUT_PROJECTIONS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "opt": ("self_attn.out_proj", "fc2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}
IDENTITY_LAYER = 1


def make_identity(model, family: str, index: int) -> None:
    layer = get_adapter(model).decoder_layers()[index]
    with torch.no_grad():
        for name in OUTPUT_PROJECTIONS[family]:
            module = layer.get_submodule(name)
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def identity_model(family):
    model = build_model(family, layers=3)
    make_identity(model, family, IDENTITY_LAYER)
    return model


def test_removal_identity_layer_scores_zero(family, identity_model, calib):
    adapter = get_adapter(identity_model)
    layers_before = list(adapter.decoder_layers())
    scores = removal_importance(adapter, calib, batch_size=2)
    assert len(scores) == 3
    assert abs(scores[IDENTITY_LAYER]) < 1e-5
    others = [abs(s) for i, s in enumerate(scores) if i != IDENTITY_LAYER]
    assert min(others) > 1e-5 and max(others) > 1e-3
    assert list(adapter.decoder_layers()) == layers_before  # every layer restored
    assert not identity_model.training


def test_activation_identity_layer_scores_zero(family, identity_model, calib):
    identity_model.train()  # mode must be restored afterwards
    scores = activation_importance(get_adapter(identity_model), calib, batch_size=2)
    assert identity_model.training
    assert len(scores) == 3
    assert abs(scores[IDENTITY_LAYER]) < 1e-5
    assert all(s > 1e-3 for i, s in enumerate(scores) if i != IDENTITY_LAYER)


def test_removal_restores_layer_on_error(calib, monkeypatch):
    model = build_model("llama", layers=2)
    adapter = get_adapter(model)
    originals = list(adapter.decoder_layers())
    calls = {"n": 0}

    import raysparse.sparsity.importance as importance

    real = importance.mean_next_token_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # first skipped-layer evaluation
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(importance, "mean_next_token_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        removal_importance(adapter, calib)
    assert list(adapter.decoder_layers()) == originals


def sample_importance(**overrides) -> LayerImportance:
    values = dict(scores=[0.5, 0.1, 0.9], method="removal", model="tiny-llama", num_layers=3,
                  samples=3, seqlen=24, seed=0, data="calib.txt", seconds=1.5)
    values.update(overrides)
    return LayerImportance(**values)


def test_compute_importance_records_protocol(calib):
    model = build_model("llama", layers=2)
    result = compute_importance(get_adapter(model), calib, "activation", "tiny-llama", seed=7, data_desc="random")
    assert (result.method, result.model, result.num_layers, result.samples, result.seqlen, result.seed) == (
        "activation", "tiny-llama", 2, 3, 24, 7)
    assert result.data == "random" and result.seconds >= 0 and len(result.scores) == 2
    with pytest.raises(ConfigError, match="unknown"):
        compute_importance(get_adapter(model), calib, "gradient", "tiny-llama", 0, "random")


def test_json_round_trip(tmp_path):
    original = sample_importance()
    path = original.save(tmp_path / "sub" / "layer_importance.json")
    assert LayerImportance.load(path, expected_model="tiny-llama", expected_layers=3) == original
    assert LayerImportance.from_dict(original.to_dict()) == original


def test_load_rejects_other_model(tmp_path):
    path = sample_importance().save(tmp_path / "layer_importance.json")
    with pytest.raises(ConfigError, match="3 layers but the model has 32"):
        LayerImportance.load(path, expected_layers=32)
    with pytest.raises(ConfigError, match="'tiny-llama', not 'meta-llama/Llama-3-8B'"):
        LayerImportance.load(path, expected_model="meta-llama/Llama-3-8B")


def test_load_rejects_missing_and_malformed(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        LayerImportance.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LayerImportance.load(bad)
    data = sample_importance().to_dict()
    del data["scores"]
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError, match="missing field"):
        LayerImportance.load(bad)
    bad.write_text(json.dumps(sample_importance(num_layers=4).to_dict()), encoding="utf-8")
    with pytest.raises(ConfigError, match="3 scores but num_layers=4"):
        LayerImportance.load(bad)
    bad.write_text(json.dumps(sample_importance(method="magic").to_dict()), encoding="utf-8")
    with pytest.raises(ConfigError, match="magic"):
        LayerImportance.load(bad)
