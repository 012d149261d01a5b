import pytest
import torch
from conftest import build_model

from raysparse.models.adapters import get_adapter
from raysparse.prune import prune_magnitude
from raysparse.sparsity.masks import (
    MaskViolation,
    apply_masks,
    load_masks,
    masks_from_weights,
    measure_sparsity,
    save_masks,
    verify_masks,
)
from raysparse.sparsity.pattern import parse_sparsity


def test_verify_detects_a_regrown_weight_and_apply_fixes_it():
    model = build_model("llama")
    adapter = get_adapter(model)
    masks = prune_magnitude(adapter, parse_sparsity(0.5))
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        model.get_parameter(name).add_(0.01)  # e.g. an optimizer step without masking
    with pytest.raises(MaskViolation, match="up_proj"):
        verify_masks(model, masks)
    apply_masks(model, masks)
    verify_masks(model, masks)
    assert measure_sparsity(adapter).overall == pytest.approx(0.5, abs=0.01)


def test_masks_round_trip_through_safetensors(tmp_path):
    model = build_model("gpt2")
    adapter = get_adapter(model)
    prune_magnitude(adapter, parse_sparsity("2:4"))
    masks = masks_from_weights(adapter)
    save_masks(masks, tmp_path)
    loaded = load_masks(tmp_path)
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[k], masks[k]) and loaded[k].dtype == torch.bool for k in masks)


def test_report_lists_every_decoder_layer():
    model = build_model("opt", layers=3)
    adapter = get_adapter(model)
    prune_magnitude(adapter, parse_sparsity(0.25))
    report = measure_sparsity(adapter)
    assert list(report.per_layer) == [0, 1, 2]
    assert "all" in report.table()
    assert report.zero_params == sum(int((p == 0).sum()) for p in adapter.prunable_weights().values())
