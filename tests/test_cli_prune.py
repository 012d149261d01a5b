"""launch/prune.py end to end on small saved models: the report, summary.json, --save, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from raysparse.cli.prune import prune_main
from raysparse.models.adapters import get_adapter
from raysparse.sparsity.masks import load_masks, measure_sparsity, verify_masks

ROOT = Path(__file__).resolve().parents[1]


def common_args(model_dir, text_files):
    return ["--model", str(model_dir), "--calib-data", str(text_files["calib"]),
            "--eval-data", str(text_files["eval"]), "--val-data", str(text_files["val"]), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "-q"]


def test_prune_saves_a_reloadable_sparse_model(saved_model_dir, text_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code = prune_main(common_args(saved_model_dir("llama"), text_files)
                      + ["--method", "sparsegpt", "--sparsity", "2:4", "--save", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test (reported)" in printed and "  dense " in printed and "  pruned " in printed and "per layer" in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "method", "pattern", "sparsity_target", "sparsity_measured", "ppl_dense",
                "ppl_pruned", "per_layer", "timings_s", "config", "protocol"):
        assert key in summary
    assert summary["pattern"] == "2:4" and summary["sparsity_measured"] == pytest.approx(0.5)
    assert set(summary["timings_s"]) >= {"load", "data", "eval_dense", "prune", "eval_pruned", "save"}
    assert summary["protocol"]["eval_seqlen"] == 32 and summary["protocol"]["nsamples"] == 4

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    verify_masks(reloaded, load_masks(out / "model"))
    assert measure_sparsity(get_adapter(reloaded)).overall == pytest.approx(summary["sparsity_measured"])

    from transformers import AutoTokenizer

    from raysparse.data.sources import resolve_source, token_stream
    from raysparse.metrics.perplexity import perplexity

    stream = token_stream(AutoTokenizer.from_pretrained(out / "model"), resolve_source(str(text_files["eval"]), "test"))
    assert perplexity(reloaded, stream, 32, progress=False).ppl == pytest.approx(summary["ppl_pruned"], rel=1e-5)


def test_same_config_and_seed_reproduce_the_perplexity(saved_model_dir, text_files):
    from raysparse import PruneConfig, prune_model

    model_dir = saved_model_dir("opt")
    values = dict(model=str(model_dir), method="wanda", sparsity="0.5", calib_data=str(text_files["calib"]),
                  eval_data=str(text_files["eval"]), val_data=str(text_files["val"]), nsamples=4, seqlen=32, eval_seqlen=32)
    first = prune_model(PruneConfig(**values)).summary
    second = prune_model(values).summary  # a plain dict works too
    assert first["ppl_pruned"] == pytest.approx(second["ppl_pruned"], rel=1e-6)
    assert first["ppl_pruned"] > first["ppl_dense"] * 0.5  # it measured something real


def write_bad_model(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "no-weights":
        from transformers import LlamaConfig

        LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    else:
        from transformers import BertConfig

        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("case,extra,fragment", [
    ("sparsity", ["--sparsity", "1.5"], "outside [0, 1)"),
    ("nm", ["--sparsity", "4:2"], "1 <= N < M"),
    ("calib", ["--calib-data", "/nonexistent/c4.txt"], "data file not found: /nonexistent/c4.txt"),
    ("nsamples", ["--nsamples", "0"], "nsamples must be an integer >= 1"),
    ("seqlen", ["--seqlen", "4096"], "larger than the model's context of 128"),
    ("no-weights", None, "no weights"),
    ("family", None, "family 'bert' is not supported; supported model_type values: gpt2, llama"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, extra, fragment, saved_model_dir, text_files,
                                                         tmp_path, capsys):
    args = common_args(saved_model_dir("llama"), text_files)
    if extra is None:
        args[1] = str(write_bad_model(tmp_path, case))
    else:
        args += extra
    out = tmp_path / "out"
    capsys.readouterr()  # drop the fixtures' own progress output
    assert prune_main(args + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err, err
    assert not out.exists()


def test_the_script_itself_exits_2_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prune.py"), "--sparsity", "2:2",
                           "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: sparsity pattern '2:2' is invalid")
    assert not (tmp_path / "x").exists()
