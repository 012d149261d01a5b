"""`launch/search.py --plan`: resources, concurrency and a measured estimate; nothing launched."""
import pytest
from conftest import fresh_ray

from raysparse.cli.search import search_main
from raysparse.search.plan import TrialResources, concurrent_trials, iteration_range, trial_resources
from raysparse.search.space_file import parse_space

SPACE = """
fixed:
  model: tiny
  method: magnitude
  schedule: iterative
  sparsity: 0.5
  recovery: masked
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 4
params:
  prune_percentage: {uniform: [0.25, 0.5]}
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


@pytest.mark.slow
def test_plan_prints_resources_fit_and_a_measured_estimate_without_launching(tiny_preset, tmp_path, capsys):

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with fresh_ray():
        code = search_main(["--plan", "--space", str(space), "--num-samples", "5", "--max-concurrent", "4",
                            "--storage", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "per trial        1 CPU = 1 CPU, 0 GPU" in out
    assert "2 trial(s) fit at once; running 2 (--max-concurrent 4)" in out
    assert "(1-3 iterations" in out  # to 50%: p=0.5 is one step, p=0.25 three
    assert "3 wave(s) of 2" in out
    total = [line for line in out.splitlines() if line.startswith("total")][0]
    assert " s" in total or " min" in total
    assert not (tmp_path / "runs").exists()  # no experiment folder: nothing was launched
    assert [line for line in out.splitlines() if line.startswith("at scale") and "1B" in line and "8B" in line]


def test_plan_refuses_resume(capsys):
    assert search_main(["--plan", "--resume", "/tmp"]) == 2
    assert "drop --resume" in capsys.readouterr().err


def test_train_in_tune_trials_count_driver_and_workers():
    space = parse_space({"fixed": {"workers": 2, "recovery": "masked"}, "params": {"lr": {"loguniform": [1e-4, 1e-3]}}},
                        source="t")
    res = trial_resources(space, cpus_per_trial=0.5, gpus_per_trial=0)
    assert (res.workers, res.cpu, res.gpu) == (2, 2.5, 0)
    gpu = trial_resources(space, cpus_per_trial=1, gpus_per_trial=0.1)
    assert (gpu.cpu, gpu.gpu) == (3, 2.1)  # CUDA trial: each FSDP worker holds a GPU


def test_concurrency_packs_single_process_trials_per_node_and_train_trials_over_the_cluster():
    nodes = [{"CPU": 3.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert concurrent_trials(TrialResources(trial_cpu=2, trial_gpu=0, workers=1), nodes) == 1  # 1 CPU left per node
    assert concurrent_trials(TrialResources(trial_cpu=1, trial_gpu=1, workers=1), nodes) == 1  # one GPU
    # Train workers spread across nodes: 4 CPUs hold one 2.5-CPU trial.
    assert concurrent_trials(TrialResources(trial_cpu=0.5, trial_gpu=0, workers=2), nodes) == 1
    assert concurrent_trials(TrialResources(trial_cpu=0.5, trial_gpu=0, workers=2), nodes * 2) == 3


def test_iteration_range_spans_the_prune_percentage_extremes():
    space = parse_space({"fixed": {"schedule": "iterative", "sparsity": 0.8},
                         "params": {"prune_percentage": {"uniform": [0.25, 0.5]}}}, source="t")
    config = space.sample_config({"prune_percentage": 0.25})
    assert iteration_range(space, config) == (3, 6)


def test_trial_time_scales_with_parameters_from_the_measured_multiples():
    from raysparse.search.plan import scale_per_trial, scale_trial_estimate

    assert scale_per_trial(10.0, 100_000_000, [1e9, 8e9]) == pytest.approx([100.0, 800.0])
    measured = {"model": "m", "params": 1e8, "forward_s": 2.0, "calib_windows": 4, "seqlen": 256,
                "phases": {"dense eval": {"x_forward": 1.0}, "wanda (one-pass)": {"x_forward": 1.2},
                           "recovery epoch (2 steps)": {"x_forward": 3.0}}}
    protocol = {"calib_tokens": 1024, "eval_tokens": 2048, "train_tokens": 1024}
    small, large = scale_trial_estimate(measured, [1e8, 8e8], protocol)["rows"]
    assert small["trial_s"] == pytest.approx(2.0 * (2 * 1.0 + 1.2 + 3.0))  # 1024 tokens = one measured forward
    assert large["trial_s"] == pytest.approx(8 * small["trial_s"])
