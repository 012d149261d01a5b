"""Structured pruning: GQA groups and MLP channels removed physically, Taylor scores, per-layer
ratios, shrunk models that reload, and the trial/CLI path with its bad-input errors."""
import copy
import json

import pytest
import torch
from conftest import build_model

from raysparse.cli.prune import prune_main
from raysparse.models.adapters import get_adapter
from raysparse.models.resize import shrink_layer, unit_params
from raysparse.structured.plan import prune_structured
from raysparse.structured.taylor import LayerUnitScores, layer_param_counts, taylor_scores, taylor_scores_layerwise

# The output projection of each family, and whether its weight is stored transposed (Conv1D).
OUTPUT_PROJ = {"llama": ("self_attn.o_proj", "mlp.down_proj", False),
               "opt": ("self_attn.out_proj", "fc2", False),
               "gpt2": ("attn.c_proj", "mlp.c_proj", True)}


def zero_inputs(module, columns, transposed):
    """Zero input features of an output projection: the removed units then contribute nothing."""
    if transposed:
        module.weight.data[columns, :] = 0
    else:
        module.weight.data[:, columns] = 0


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_removing_one_gqa_group_removes_its_kv_head_query_heads_and_o_proj_columns():
    model = build_model("llama")  # 8 query heads, 4 kv heads, head_dim 8: 2 queries per group
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[0]
    shape = shrink_layer(adapter, layer, keep_groups=torch.tensor([0, 2, 3]), keep_channels=torch.arange(128))
    attn = layer.self_attn
    assert (shape.num_heads, shape.num_kv_heads) == (6, 3)
    assert attn.q_proj.weight.shape == (48, 64) and attn.k_proj.weight.shape == (24, 64)
    assert attn.v_proj.weight.shape == (24, 64) and attn.o_proj.weight.shape == (64, 48)

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = logits(reference, ids)
    # Group 1 = kv head 1 and query heads 2, 3 (columns 16..31 of o_proj).
    zero_inputs(reference.model.layers[0].self_attn.o_proj, slice(16, 32), False)
    expected = logits(reference, ids)
    assert not torch.allclose(dense, expected, atol=1e-4)  # the group mattered
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    # Kept kv heads keep their own query heads: head 4,5 (group 2) now sit at positions 2,3.
    torch.testing.assert_close(attn.q_proj.weight[16:32], reference.model.layers[0].self_attn.q_proj.weight[32:48])


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_shrunk_layer_equals_reference_with_units_zeroed(family):
    model = build_model(family)
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    head_dim = adapter.attention_shape().head_dim
    width = adapter.attention_shape().queries_per_group * head_dim
    layer = adapter.decoder_layers()[1]
    channels = adapter.mlp_units(layer).count  # 128 (GPT-2: 4 x 64)
    keep_channels = torch.tensor([c for c in range(channels) if c not in (3, 7, 50)])
    shrink_layer(adapter, layer, keep_groups=torch.tensor([0, 1, 3]), keep_channels=keep_channels)

    attn_out, mlp_out, transposed = OUTPUT_PROJ[family]
    ref_layer = get_adapter(reference).decoder_layers()[1]
    zero_inputs(ref_layer.get_submodule(attn_out), slice(2 * width, 3 * width), transposed)
    zero_inputs(ref_layer.get_submodule(mlp_out), [3, 7, 50], transposed)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    assert adapter.layer_shape(layer).intermediate_size == channels - 3


def test_taylor_scores_rank_a_dead_unit_last_and_pruning_removes_it():
    model = build_model("llama")
    adapter = get_adapter(model)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # kill group 2 (kv head 2, query heads 4-5) and MLP channel 9 of layer 0
        attn.q_proj.weight[32:48] = 0
        attn.k_proj.weight[16:24] = 0
        attn.v_proj.weight[16:24] = 0
        attn.o_proj.weight[:, 32:48] = 0
        model.model.layers[0].mlp.down_proj.weight[:, 9] = 0
        model.model.layers[0].mlp.gate_proj.weight[9] = 0
        model.model.layers[0].mlp.up_proj.weight[9] = 0
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    scores = taylor_scores(adapter, windows, [0, 1], torch.device("cpu"), batch_size=2)
    assert [len(s.attention) for s in scores] == [4, 4] and [len(s.mlp) for s in scores] == [128, 128]
    assert scores[0].attention[2] == 0.0 and scores[0].mlp[9] == 0.0
    assert all(v > 0 for i, v in enumerate(scores[0].attention) if i != 2)
    assert all(p.grad is None for p in model.parameters())  # gradients released

    before = attn.k_proj.weight.detach().clone()
    result = prune_structured(adapter, scores, [0.25, 0.0])
    assert result.plans[0].groups_removed == 1
    kept_k = attn.k_proj.weight
    assert kept_k.shape == (24, 64)
    torch.testing.assert_close(kept_k, torch.cat([before[:16], before[24:]]))  # group 2 is the one gone
    assert result.plans[1].params_removed == 0 and model.model.layers[1].self_attn.k_proj.weight.shape == (32, 64)


@pytest.mark.parametrize("indices", [[0, 1, 2], [1, 2]])
def test_layer_by_layer_taylor_scores_equal_the_whole_model_backward(family, indices):
    """--offload: forward walk, loss from the final norm + LM head, backward walk per layer."""
    model = build_model(family, layers=3)
    adapter = get_adapter(model)
    windows = torch.randint(3, 300, (5, 24), generator=torch.Generator().manual_seed(1))
    whole = taylor_scores(adapter, windows, indices, torch.device("cpu"), batch_size=2)
    walked = taylor_scores_layerwise(adapter, windows, indices, torch.device("cpu"), batch_size=2)
    assert [s.layer for s in walked] == indices
    for a, b in zip(whole, walked):
        torch.testing.assert_close(torch.tensor(b.attention), torch.tensor(a.attention), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(torch.tensor(b.mlp), torch.tensor(a.mlp), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # restored as they were


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_each_layer_lands_on_its_ratio_within_one_channel(ratio):
    model = build_model("llama", layers=4)
    adapter = get_adapter(model)
    indices = [1, 2]  # layers 0 and 3 stay untouched
    sizes = layer_param_counts(adapter, indices)
    untouched = {i: adapter.layer_shape(adapter.decoder_layers()[i]) for i in (0, 3)}
    scores = [LayerUnitScores(i, torch.rand(4).tolist(), torch.rand(128).tolist()) for i in indices]
    channel = unit_params(adapter, adapter.decoder_layers()[1], adapter.mlp_units(adapter.decoder_layers()[1]))
    result = prune_structured(adapter, scores, [ratio, ratio])
    for plan, size in zip(result.plans, sizes):
        assert plan.params_before == size
        assert abs(plan.params_removed - ratio * size) <= channel / 2 + 1e-9
    assert layer_param_counts(adapter, indices) == [s - p.params_removed for s, p in zip(sizes, result.plans)]
    for i, shape in untouched.items():
        assert adapter.layer_shape(adapter.decoder_layers()[i]) == shape


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_saved_shrunk_model_reloads_with_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM

    import raysparse.models.shrunk as shrunk_models

    model = build_model(family, layers=3)
    adapter = get_adapter(model)
    channels = adapter.mlp_units(adapter.decoder_layers()[0]).count
    scores = [LayerUnitScores(i, torch.rand(4).tolist(), torch.rand(channels).tolist()) for i in range(3)]
    prune_structured(adapter, scores, [0.1, 0.5, 0.3])  # a different size per layer
    shrunk_models.mark_shrunk(model)
    assert model.config.model_type == f"raysparse_{family}"
    shapes = model.config.raysparse_layer_shapes
    assert len({json.dumps(s, sort_keys=True) for s in shapes}) == 3
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["raysparse_layer_shapes"] == shapes

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))
    generated = reloaded.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 20)
    # Ray Train workers rebuild the model from its class and config, then load the state dict.
    rebuilt = type(model)(model.config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(rebuilt.eval(), ids), logits(model, ids))


def cli_args(model_dir, text_files, out):
    return ["--model", str(model_dir), "--calib-data", str(text_files["calib"]), "--eval-data",
            str(text_files["eval"]), "--val-data", str(text_files["val"]), "--seqlen", "32", "--eval-seqlen", "32", "--method", "structured",
            "--num-examples", "4", "--max-seq-len", "32", "--output", str(out), "-q"]


def test_structured_trial_reports_sizes_latency_and_reloads_to_the_same_perplexity(
        saved_model_dir, text_files, tmp_path, capsys):
    from raysparse.data.sources import resolve_source, token_stream
    from raysparse.metrics.perplexity import perplexity
    from raysparse.models.loading import load_model

    out = tmp_path / "run"
    code = prune_main(cli_args(saved_model_dir("llama"), text_files, out) + [
        "--pruning-ratio", "0.3", "--pruning-strategy", "inverse", "--importance-samples", "4",
        "--min-pruning-rate", "0.1", "--max-pruning-rate", "0.6", "--test-after-prune", "--save"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "latency/token" in printed and "importance" in printed
    summary = json.loads((out / "summary.json").read_text())
    structured = summary["structured"]
    assert summary["method"] == "structured" and summary["pattern"] == "structured"
    assert structured["params_after"] < structured["params_before"]
    assert structured["ratio_achieved"] == pytest.approx(0.3, abs=0.01)
    assert summary["sparsity_measured"] == pytest.approx(structured["sparsity"])
    ratios = structured["layer_ratios"]
    scores = summary["layer_importance"]["scores"]
    assert ratios[scores.index(max(scores))] == min(ratios)  # inverse: most important pruned least
    for key in ("decode_ms_per_token", "prefill_ms_per_token"):
        assert structured["latency_before"][key] > 0 and structured["latency_after"][key] > 0
    assert summary["sample_after_prune"]["continuation"]
    assert summary["ppl_pruned"] > 0 and (out / "layer_importance.json").is_file()

    loaded = load_model(str(out / "model"), device="cpu")
    assert type(loaded.model).__name__ == "ShrunkLlamaForCausalLM"
    stream = token_stream(loaded.tokenizer, resolve_source(str(text_files["eval"]), "test"))
    assert perplexity(loaded.model, stream, 32, progress=False).ppl == pytest.approx(summary["ppl_final"], rel=1e-5)


@pytest.mark.parametrize("recovery", ["masked", "lora"])
def test_recovery_trains_the_shrunk_model(saved_model_dir, text_files, tmp_path, recovery):
    out = tmp_path / recovery
    code = prune_main(cli_args(saved_model_dir("llama"), text_files, out) + [
        "--pruning-ratio", "0.25", "--recovery", recovery, "--max-steps", "2", "--train-samples", "8",
        "--batch-size", "4", "--lr", "1e-3", "--no-keep-best", "--no-test-after-prune"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    record = summary["history"][0]
    assert record["steps"] == 2 and record["ppl_after_prune"] is not None  # recovery's baseline
    assert "sample_after_prune" not in record
    assert summary["structured"]["params_after"] < summary["structured"]["params_before"]


@pytest.mark.parametrize("extra, message", [
    (["--pruning-ratio", "1.2"], "pruning_ratio 1.2 is outside (0, 1)"),
    (["--pruning-ratio", "0"], "pruning_ratio 0.0 is outside (0, 1)"),
    ([], "needs --pruning-ratio"),
    (["--pruning-ratio", "0.3", "--schedule", "iterative"], "structured pruning runs one-shot"),
    (["--pruning-ratio", "0.3", "--pruning-strategy", "inverse", "--min-pruning-rate", "0.5",
      "--max-pruning-rate", "0.2"], "min_pruning_rate"),
    (["--pruning-ratio", "0.3", "--pruning-strategy", "inverse", "--min-pruning-rate", "0.4",
      "--max-pruning-rate", "0.6"], "below min_pruning_rate"),
    (["--pruning-ratio", "0.7", "--pruning-strategy", "inverse", "--max-pruning-rate", "0.6"],
     "above max_pruning_rate"),
    (["--pruning-ratio", "0.3", "--layer-start", "1", "--layer-end", "5"], "outside the model's 2 decoder layers"),
    (["--pruning-ratio", "0.3", "--layer-start", "1", "--layer-end", "1"], "is empty"),
])
def test_bad_structured_input_is_one_clear_line(saved_model_dir, text_files, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    model_dir = saved_model_dir("llama")
    capsys.readouterr()  # drop the fixture's own output
    assert prune_main(cli_args(model_dir, text_files, out) + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_structured_settings_are_refused_for_unstructured_methods(saved_model_dir, text_files, tmp_path, capsys):
    args = cli_args(saved_model_dir("llama"), text_files, tmp_path / "x")
    args[args.index("structured")] = "wanda"
    assert prune_main(args + ["--pruning-ratio", "0.3"]) == 2
    assert "pruning_ratio applies to --method structured" in capsys.readouterr().err


def test_taylor_scores_are_computed_once_per_key_through_the_stats_cache(saved_model_dir, text_files, tmp_path):
    from raysparse.trial.runner import run_trial

    model_dir = saved_model_dir("llama")
    base = dict(model=str(model_dir), method="structured", calib_data=str(text_files["calib"]),
                eval_data=str(text_files["eval"]), val_data=str(text_files["val"]), seqlen=32, eval_seqlen=32, num_examples=4, max_seq_len=32,
                stats_cache=str(tmp_path / "cache"))
    first = run_trial(dict(base, pruning_ratio=0.2)).summary
    second = run_trial(dict(base, pruning_ratio=0.4)).summary  # another ratio, same dense-model scores
    third = run_trial(dict(base, pruning_ratio=0.4, num_examples=5)).summary  # another key

    def outcome(summary):
        return [e["outcome"] for e in summary["stats_cache"] if e["kind"] == "taylor_scores"]

    assert outcome(first) == ["computed"] and outcome(second) == ["hit"] and outcome(third) == ["computed"]
    assert second["structured"]["params_after"] < first["structured"]["params_after"]


def build_gqa_variant(family: str):
    """Qwen2 (biased q/k/v projections) and Qwen3 (per-head q/k norms): GQA variants of Llama."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=128)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common)).eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_gqa_variants_shrink_exactly_and_reload(family, tmp_path):
    from transformers import AutoModelForCausalLM

    import raysparse.models.shrunk as shrunk_models

    model = build_gqa_variant(family)
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    shrink_layer(adapter, adapter.decoder_layers()[0], torch.tensor([1, 2, 3]),
                 torch.tensor([c for c in range(128) if c != 5]))
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (24, 64)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.k_proj.bias.shape == (24,)  # biases sliced with their rows
    ref_layer = reference.model.layers[0]
    zero_inputs(ref_layer.self_attn.o_proj, slice(0, 16), False)  # group 0 = query heads 0, 1
    zero_inputs(ref_layer.mlp.down_proj, [5], False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    shrunk_models.mark_shrunk(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.model_type == f"raysparse_{family}"
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_mha_families_prune_structurally_through_the_cli(family, saved_model_dir, text_files, tmp_path):
    from raysparse.data.sources import resolve_source, token_stream
    from raysparse.metrics.perplexity import perplexity
    from raysparse.models.loading import load_model

    out = tmp_path / family
    assert prune_main(cli_args(saved_model_dir(family), text_files, out) + ["--pruning-ratio", "0.3", "--save"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    plans = summary["structured"]["layers"]
    assert all(p["heads_after"] < p["heads_before"] for p in plans)  # 4 heads, ratio 0.3: one head goes
    assert all(p["groups_before"] == p["heads_before"] for p in plans)  # MHA: a group is one head
    loaded = load_model(str(out / "model"), device="cpu")
    stream = token_stream(loaded.tokenizer, resolve_source(str(text_files["eval"]), "test"))
    assert perplexity(loaded.model, stream, 32, progress=False).ppl == pytest.approx(summary["ppl_final"], rel=1e-5)


def test_a_saved_shrunk_model_loads_with_trust_remote_code_without_importing_raysparse(tmp_path):
    """What an evaluation harness does: AutoModelForCausalLM + trust_remote_code, nothing else."""
    import subprocess
    import sys

    import raysparse.models.shrunk as shrunk_models

    model = build_model("llama")
    scores = [LayerUnitScores(i, torch.rand(4).tolist(), torch.rand(128).tolist()) for i in range(2)]
    prune_structured(get_adapter(model), scores, [0.3, 0.1])
    shrunk_models.mark_shrunk(model)
    model.save_pretrained(tmp_path / "model")
    ids = torch.arange(12).view(1, -1)
    torch.save(logits(model, ids), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)\n"
        "with torch.no_grad():\n"
        "    got = model(torch.arange(12).view(1, -1)).logits\n"
        f"assert torch.allclose(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-6)\n"
        "print(type(model).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ShrunkLlamaForCausalLM")
