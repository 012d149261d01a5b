"""The GPU check (tests/gpu/run.sh) passes its own dry run on CPU: the same checks at tiny
sizes, every CUDA-only part listed as skipped, one JSON report. The dry run is slow (a local
Ray instance for the FSDP check, eight trials); the refusal without a GPU is fast."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parent / "gpu"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(GPU_DIR))
    import gpu_check

    return gpu_check


@pytest.mark.slow  # starts a local Ray instance and runs eight trials: minutes on a loaded 2-core machine
@pytest.mark.heavy
def test_dry_run_on_cpu_runs_every_check_and_names_what_it_skipped(gpu_check, saved_model_dir, text_files, tmp_path):
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--model", str(saved_model_dir("llama")), "--out", str(out),
                           "--calib-data", str(text_files["calib"]), "--val-data", str(text_files["val"]),
                           "--eval-data", str(text_files["eval"])])
    report = json.loads((out / "gpu_check_dry_run.json").read_text())
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert code == 0, {name: check.get("error") for name, check in report["checks"].items()}
    assert statuses == {"gguf_load": "skipped", "bf16_trial": "ok", "layerwise_cost": "ok", "fsdp_recovery": "ok",
                        "structured_latency": "ok", "semi_structured_24": "ok", "offload": "ok"}
    assert report["dry_run"] and report["device"] == "cpu"
    skipped = " ".join(report["skipped"])
    assert "bf16" in skipped and "NCCL" in skipped and "to_sparse_semi_structured" in skipped
    cost = report["checks"]["layerwise_cost"]
    assert cost["forward_s"] > 0 and cost["wanda"]["over_forward"] > 0 and cost["sparsegpt"]["over_forward"] > 0
    assert report["checks"]["fsdp_recovery"]["backend"] == "gloo" and report["checks"]["fsdp_recovery"]["steps"] > 0
    rows = report["checks"]["semi_structured_24"]["rows"]
    assert rows and all(row["zeros"] == 0.5 and row["dense_ms"] > 0 for row in rows)


def test_without_a_gpu_the_real_run_refuses_in_one_line(gpu_check, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real run would start")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no CUDA GPU is visible")
