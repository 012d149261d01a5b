"""--offload cpu|disk: the same masks, weights and perplexity as a model held whole, and a
model pruned under a memory limit smaller than its weights."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer

from raysparse.config import PruneConfig
from raysparse.errors import ConfigError
from raysparse.metrics.perplexity import perplexity
from raysparse.models.loading import load_model
from raysparse.prune import prune
from raysparse.trial.runner import run_trial

ROOT = Path(__file__).resolve().parents[1]


def trial(model_dir: Path, text_files, out: Path, **overrides) -> dict:
    values = dict(model=str(model_dir), method="sparsegpt", sparsity="0.5", nsamples=4, seqlen=32, eval_seqlen=32,
                  eval_max_windows=4, calib_data=str(text_files["calib"]), eval_data=str(text_files["eval"]),
                  val_data=str(text_files["val"]), device="cpu", dtype="float32", output=str(out), save=True)
    values.update(overrides)
    return run_trial(values).summary


@pytest.mark.parametrize("offload", [pytest.param("cpu", marks=pytest.mark.slow), "disk"])
def test_an_offloaded_trial_matches_the_model_held_whole(saved_model_dir, text_files, tmp_path, offload):
    from safetensors.torch import load_file

    from raysparse.sparsity.masks import load_masks

    folder = saved_model_dir("llama")
    whole = trial(folder, text_files, tmp_path / "whole")
    offloaded = trial(folder, text_files, tmp_path / offload, offload=offload)
    for key in ("ppl_dense", "ppl_pruned", "sparsity_measured"):
        assert offloaded[key] == whole[key], key  # bit-identical: the same arithmetic on the same values
    masks_whole, masks_off = load_masks(tmp_path / "whole" / "model"), load_masks(tmp_path / offload / "model")
    assert masks_whole.keys() == masks_off.keys()
    assert all(torch.equal(masks_whole[name], masks_off[name]) for name in masks_whole)
    # SparseGPT updates the weights it keeps: with --offload disk they were written into the mapped file.
    weights_whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    weights_off = load_file(tmp_path / offload / "model" / "model.safetensors")
    assert weights_whole.keys() == weights_off.keys()
    assert all(torch.equal(weights_whole[k], weights_off[k]) for k in weights_whole)


def test_disk_offload_maps_the_weights_instead_of_loading_them(saved_model_dir):
    folder = saved_model_dir("llama")
    loaded = load_model(str(folder), device="cpu", dtype="float32", offload="disk")
    reference = load_model(str(folder), device="cpu", dtype="float32")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)
    weight = loaded.model.model.layers[0].mlp.up_proj.weight
    sharing = [p for p in loaded.model.parameters() if p.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()]
    assert len(sharing) == len(list(loaded.model.parameters()))  # every parameter is a view of the one mapping
    def tied(model):
        return model.lm_head.weight is model.model.embed_tokens.weight

    assert tied(loaded.model) == tied(reference.model)  # tied stays tied, untied stays two tensors


def test_offload_with_recovery_is_refused_before_any_work():
    from raysparse.config import TrialConfig

    with pytest.raises(ConfigError, match="--offload disk"):
        TrialConfig(offload="disk", recovery="masked").validate()
    TrialConfig(offload="cpu", method="structured", pruning_ratio=0.25).validate()  # structured is covered


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_an_offloaded_structured_trial_removes_the_same_units(saved_model_dir, text_files, tmp_path, offload):
    """Taylor scores from the layer-by-layer walk, the shrink and the evaluation, with --offload."""
    folder = saved_model_dir("llama")
    settings = dict(method="structured", pruning_ratio=0.25, num_examples=4, max_seq_len=24)
    whole = trial(folder, text_files, tmp_path / "whole", **settings)
    offloaded = trial(folder, text_files, tmp_path / offload, offload=offload, **settings)
    from safetensors.torch import load_file

    assert whole["structured"]["layers"] == offloaded["structured"]["layers"]
    kept_whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    kept_off = load_file(tmp_path / offload / "model" / "model.safetensors")
    assert kept_whole.keys() == kept_off.keys()  # the same groups and channels kept, layer by layer
    assert all(torch.equal(kept_whole[k], kept_off[k]) for k in kept_whole)
    assert offloaded["structured"]["latency_offloaded"] is True
    for key in ("ppl_dense", "sparsity_measured"):
        assert offloaded[key] == whole[key], key
    assert offloaded["ppl_final"] == pytest.approx(whole["ppl_final"], rel=1e-5)


CHILD = """
import hashlib, json, os, resource, sys
import torch
from raysparse.config import PruneConfig
from raysparse.metrics.perplexity import perplexity
from raysparse.models.loading import load_model
from raysparse.models.offload import layers_on_device
from raysparse.prune import prune

def vm_data():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

folder, mode, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
calib = torch.load(os.path.join(folder, "calib.pt"))
resource.setrlimit(resource.RLIMIT_DATA, (vm_data() + headroom, resource.RLIM_INFINITY))
try:
    loaded = load_model(folder, device="cpu", dtype="float32", offload=mode)
    masks = prune(loaded.adapter, PruneConfig(method="wanda", sparsity="0.5", calib_batch_size=4), calib,
                  torch.device("cpu"))
    with layers_on_device(loaded.adapter, torch.device("cpu")):
        ppl = perplexity(loaded.model, calib.reshape(-1), 32, progress=False).ppl
except (MemoryError, RuntimeError) as exc:
    if "alloc" not in str(exc):
        raise
    print(json.dumps({"out_of_memory": True}))
    sys.exit(0)
print(json.dumps({"out_of_memory": False, "ppl": ppl,
                  "masks": {n: hashlib.sha256(m.numpy().tobytes()).hexdigest() for n, m in masks.items()}}))
"""

HEADROOM = 64 * 2**20


@pytest.mark.slow
def test_disk_offload_prunes_a_model_larger_than_the_memory_limit(tmp_path):
    """A 97 MiB model pruned by a process allowed 64 MiB of data beyond what its imports use.

    RLIMIT_DATA counts a process's private writable memory (heap, anonymous mappings), not
    file pages mapped shared, so it caps exactly what --offload disk must not need. The
    child fixes glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) so freed large blocks go back
    to the system instead of staying in a heap the limit still counts. The same child
    without offload must run out of memory, or the limit proves nothing.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes > 1.4 * HEADROOM
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    calib = torch.randint(0, 2048, (8, 32), generator=torch.Generator().manual_seed(1))
    torch.save(calib, folder / "calib.pt")
    del model

    reference = load_model(str(folder), device="cpu", dtype="float32")
    masks = prune(reference.adapter, PruneConfig(method="wanda", sparsity="0.5", calib_batch_size=4), calib,
                  torch.device("cpu"))
    expected_ppl = perplexity(reference.model, calib.reshape(-1), 32, progress=False).ppl
    expected = {n: hashlib.sha256(m.numpy().tobytes()).hexdigest() for n, m in masks.items()}

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               TMPDIR=str(tmp_path))

    def child(mode: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode, str(HEADROOM)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert child("none")["out_of_memory"]  # the limit bites: the model does not fit held whole
    offloaded = child("disk")
    assert not offloaded["out_of_memory"]
    assert offloaded["masks"] == expected
    assert offloaded["ppl"] == expected_ppl
