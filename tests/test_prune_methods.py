"""Pruners against independent reference computations, on tiny configs of the real classes."""
import pytest
import torch
from conftest import build_model
from torch import nn

from raysparse.models.adapters import ModelAdapter, get_adapter
from raysparse.prune import SparseGPTMethod, WandaMethod, prune_layerwise, prune_magnitude, sparsegpt_reconstruct
from raysparse.prune.selection import nm_mask
from raysparse.prune.wanda import InputNormCollector
from raysparse.sparsity.masks import measure_sparsity, verify_masks
from raysparse.sparsity.pattern import parse_sparsity

CPU = torch.device("cpu")


def calibration(vocab: int = 300, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(1))


def run_method(model, method: str, sparsity: str):
    adapter = get_adapter(model)
    pattern = parse_sparsity(sparsity)
    if method == "magnitude":
        return adapter, prune_magnitude(adapter, pattern)
    impl = WandaMethod(pattern) if method == "wanda" else SparseGPTMethod(pattern)
    return adapter, prune_layerwise(adapter, impl, calibration(), CPU, batch_size=3)


def test_wanda_mask_matches_direct_computation_on_a_layer():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 10, 32) * torch.linspace(0.1, 3.0, 32)  # columns of very different norms
    expected_scores = layer.weight.detach().abs() * x.reshape(-1, 32).norm(dim=0)
    k = 32 // 2
    expected = torch.zeros(16, 32, dtype=torch.bool)
    for row in range(16):
        expected[row, expected_scores[row].argsort()[:k]] = True

    stats = InputNormCollector(32, CPU)
    stats.add_batch(x[:2])
    stats.add_batch(x[2:])
    remove = WandaMethod(parse_sparsity(0.5)).prune_module(ModelAdapter, layer, stats)
    assert torch.equal(remove, expected)
    assert torch.all(layer.weight[expected] == 0) and torch.all(layer.weight[~expected] != 0)


def test_wanda_in_the_layerwise_engine_uses_the_real_layer_inputs():
    model = build_model("llama")
    calib = calibration()
    captured = []
    q_proj = model.model.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach()))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    hook.remove()
    x = torch.cat(captured).reshape(-1, q_proj.in_features)
    scores = q_proj.weight.detach().abs() * x.norm(dim=0)
    expected_keep = torch.ones_like(scores, dtype=torch.bool)
    expected_keep.scatter_(1, scores.topk(q_proj.in_features // 2, dim=1, largest=False).indices, False)

    masks = prune_layerwise(get_adapter(model), WandaMethod(parse_sparsity(0.5)), calib, CPU, batch_size=3)
    assert torch.equal(masks["model.layers.0.self_attn.q_proj.weight"], expected_keep)


@pytest.mark.parametrize("passes", ["two", "one"])
def test_sublayers_fed_the_same_tensor_share_one_collector_and_the_masks_do_not_change(passes, monkeypatch):
    """q/k/v (and gate/up) read one tensor: X X^T and its factorisation are computed once, and the
    SparseGPT masks and weights equal pruning each sublayer from its own collector."""
    from raysparse.prune.layerwise import SharedInputStats

    made = []
    real_make = SparseGPTMethod.make_collector
    monkeypatch.setattr(SparseGPTMethod, "make_collector",
                        lambda self, module: made.append(module) or real_make(self, module))
    shared_model = build_model("llama")
    masks = prune_layerwise(get_adapter(shared_model), SparseGPTMethod(parse_sparsity("0.5")), calibration(), CPU,
                            batch_size=3, passes=passes)
    assert len(made) == 4 * 2  # per layer: q/k/v, o, gate/up, down

    def unshared_add(self, name, x):  # the reference: every sublayer its own collector
        self.owner[name] = name
        self.collectors.setdefault(name, real_make(self.method, self.linears[name])).add_batch(x.detach())

    monkeypatch.setattr(SharedInputStats, "add", unshared_add)
    if passes == "one":
        return  # the one-pass reference is test_one_pass.py's (each sublayer pruned in its pre-hook)
    separate_model = build_model("llama")
    separate = prune_layerwise(get_adapter(separate_model), SparseGPTMethod(parse_sparsity("0.5")), calibration(),
                               CPU, batch_size=3)
    assert masks.keys() == separate.keys() and all(torch.equal(masks[k], separate[k]) for k in masks)
    for a, b in zip(shared_model.parameters(), separate_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(sparsity):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=gen)
    mixing = torch.randn(96, 96, generator=gen) * 0.3 + torch.eye(96)
    x = torch.randn(2048, 96, generator=gen) @ mixing  # correlated inputs, as in real layers
    hessian = 2 * x.t() @ x / x.shape[0]
    pattern = parse_sparsity(sparsity)

    sgpt_weight, remove = sparsegpt_reconstruct(weight, hessian, pattern, percdamp=0.01, blocksize=32)
    if pattern.is_nm:
        mag_remove = nm_mask(weight.abs(), pattern.n, pattern.m)
    else:
        k = int(weight.numel() * pattern.ratio)
        mag_remove = torch.zeros(weight.numel(), dtype=torch.bool)
        mag_remove[weight.abs().flatten().topk(k, largest=False).indices] = True
        mag_remove = mag_remove.view_as(weight)
    mag_weight = weight.masked_fill(mag_remove, 0)

    def error(w):
        return float(torch.linalg.norm(x @ weight.t() - x @ w.t()))

    assert torch.all(sgpt_weight[remove] == 0)
    assert abs(remove.float().mean().item() - pattern.ratio) < 0.01
    assert error(sgpt_weight) < 0.95 * error(mag_weight)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
def test_nm_masks_have_exactly_n_zeros_per_group(family, method, sparsity):
    model = build_model(family)
    adapter, masks = run_method(model, method, sparsity)
    n, m = parse_sparsity(sparsity).n, parse_sparsity(sparsity).m
    verify_masks(model, masks)
    for module in adapter.prunable_modules().values():
        matrix = adapter.weight_matrix(module)  # groups run along the input dimension
        zeros = (matrix == 0).reshape(matrix.shape[0], -1, m).sum(dim=2)
        assert torch.all(zeros == n), f"{module}: group zero counts {zeros.unique().tolist()}"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_measured_sparsity_equals_requested(family, method, target):
    model = build_model(family)
    adapter, masks = run_method(model, method, str(target))
    verify_masks(model, masks)
    report = measure_sparsity(adapter)
    for name, module in adapter.prunable_modules().items():
        in_features = adapter.weight_matrix(module).shape[1]
        assert abs(report.per_weight[f"{name}.weight"] - target) <= 1.0 / in_features + 1e-9
    assert report.overall == pytest.approx(target, abs=0.01)


def test_global_magnitude_hits_the_overall_target_with_uneven_layers():
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(10)  # a layer of much larger weights
    adapter = get_adapter(model)
    prune_magnitude(adapter, parse_sparsity(0.5), scope="global")
    report = measure_sparsity(adapter)
    assert report.overall == pytest.approx(0.5, abs=0.002)
    assert report.per_weight["model.layers.1.mlp.down_proj.weight"] < 0.1


def test_same_seed_gives_same_masks():
    first = run_method(build_model("opt"), "sparsegpt", "0.5")[1]
    second = run_method(build_model("opt"), "sparsegpt", "0.5")[1]
    assert all(torch.equal(first[k], second[k]) for k in first)
