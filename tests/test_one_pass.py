"""One-pass ("true sequential") calibration for Wanda and SparseGPT (issue 13).

In one-pass mode each sublayer is pruned just before it runs, on the outputs of the pruned
sublayers before it. The checks: the first sublayer of the first layer sees the dense inputs
(same mask as two-pass), a later sublayer's mask is Wanda's on the *pruned* earlier
sublayers' outputs, sparsity is exact, and on the tiny preset the pruned perplexity is
finite and close to the reference two-pass mode.
"""
import copy
import math

import pytest
import torch
from conftest import build_model

from raysparse.data.sources import calibration_windows, resolve_source, token_stream
from raysparse.metrics.perplexity import perplexity
from raysparse.models.adapters import get_adapter
from raysparse.prune import SparseGPTMethod, WandaMethod, prune_layerwise
from raysparse.sparsity.masks import measure_sparsity, verify_masks
from raysparse.sparsity.pattern import parse_sparsity

CPU = torch.device("cpu")


def calibration(vocab: int = 300, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(1))


def wanda_keep(weight: torch.Tensor, inputs: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    scores = weight.abs() * inputs.reshape(-1, weight.shape[1]).norm(dim=0)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(int(weight.shape[1] * ratio), dim=1, largest=False).indices, False)
    return keep


def test_one_pass_prunes_each_sublayer_on_the_pruned_outputs_before_it():
    model = build_model("llama")
    dense = copy.deepcopy(model)
    calib = calibration()
    masks = prune_layerwise(get_adapter(model), WandaMethod(parse_sparsity(0.5)), calib, CPU, batch_size=3,
                            passes="one")
    attn = dense.model.layers[0].self_attn
    captured: dict[str, list[torch.Tensor]] = {"q": [], "o": []}
    hooks = [attn.q_proj.register_forward_hook(lambda _m, i, _o: captured["q"].append(i[0])),
             attn.o_proj.register_forward_hook(lambda _m, i, _o: captured["o"].append(i[0]))]
    with torch.no_grad():  # the dense model with only layer 0's q/k/v pruned: what o_proj saw in one pass
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attn, name).weight.mul_(masks[f"model.layers.0.self_attn.{name}.weight"])
        dense(input_ids=calib, use_cache=False)
    for hook in hooks:
        hook.remove()
    q_keep = masks["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q_keep, wanda_keep(attn.q_proj.weight, torch.cat(captured["q"])))  # dense inputs
    o_keep = masks["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(o_keep, wanda_keep(attn.o_proj.weight, torch.cat(captured["o"])))  # pruned q/k/v


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method,sparsity", [("wanda", "0.5"), ("sparsegpt", "2:4")])
def test_one_pass_masks_reach_exact_sparsity(family, method, sparsity):
    model = build_model(family)
    pattern = parse_sparsity(sparsity)
    impl = WandaMethod(pattern) if method == "wanda" else SparseGPTMethod(pattern)
    adapter = get_adapter(model)
    masks = prune_layerwise(adapter, impl, calibration(), CPU, batch_size=3, passes="one")
    verify_masks(model, masks)
    assert set(masks) == {f"{name}.weight" for name in adapter.prunable_modules()}
    report = measure_sparsity(adapter)
    for name, module in adapter.prunable_modules().items():
        matrix = adapter.weight_matrix(module)
        if pattern.is_nm:
            zeros = (matrix == 0).reshape(matrix.shape[0], -1, pattern.m).sum(dim=2)
            assert torch.all(zeros == pattern.n), name
        else:
            assert report.per_weight[f"{name}.weight"] == pytest.approx(0.5, abs=1.0 / matrix.shape[1] + 1e-9)


def test_unknown_pass_count_is_refused():
    with pytest.raises(ValueError, match="passes must be one of"):
        prune_layerwise(get_adapter(build_model("llama")), WandaMethod(parse_sparsity(0.5)), calibration(), CPU,
                        passes="three")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_pass_perplexity_is_close_to_two_pass_on_the_tiny_preset(method, tiny_preset):
    from raysparse.models.loading import load_model

    loaded = load_model(str(tiny_preset), device="cpu", dtype="float32")
    stream = token_stream(loaded.tokenizer, resolve_source("pydoc", "calibration"))
    calib = calibration_windows(stream, 16, 64, seed=0)
    evaluation = stream[-64 * 24:]
    results = {}
    for passes in ("two", "one"):
        model = copy.deepcopy(loaded.model)
        impl = WandaMethod(parse_sparsity(0.5)) if method == "wanda" else SparseGPTMethod(parse_sparsity(0.5))
        prune_layerwise(get_adapter(model), impl, calib, CPU, batch_size=4, passes=passes)
        results[passes] = perplexity(model, evaluation, 64, progress=False).ppl
    dense = perplexity(loaded.model, evaluation, 64, progress=False).ppl
    assert all(math.isfinite(p) for p in results.values())
    assert results["one"] > dense * 0.99  # pruning costs something ...
    assert abs(math.log(results["one"] / results["two"])) < 0.15, results  # ... about what the reference costs
