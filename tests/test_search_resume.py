"""Driver-kill + --resume: a separate module so the killed driver owns its own local Ray."""
import json

import pytest
import ray
from conftest import fresh_ray
from test_search import SPACE

from raysparse.cli.search import search_main

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

def is_complete(summary_file) -> bool:
    """A finished trial's summary that Tune has copied in full (its final report's checkpoint)."""
    try:
        return json.loads(summary_file.read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


def test_resume_after_killing_the_driver_reruns_no_finished_trial(tiny_preset, tmp_path):
    """Kill `launch/search.py` after its first finished trial; `--resume` completes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    space = tmp_path / "space.yaml"
    masked_only = "\n".join(line for line in SPACE.splitlines() if "recovery" not in line and "lora" not in line)
    space.write_text(masked_only.replace("fixed:\n", "fixed:\n  recovery: masked\n"))
    root = Path(__file__).resolve().parents[1]
    assert not ray.is_initialized()
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, str(root / "launch" / "search.py"), "--space", str(space),
                             "--num-samples", "4", "--max-concurrent", "1", "--storage", str(tmp_path / "runs"),
                             "--name", "killed", "--no-early-stopping"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    experiment = tmp_path / "runs" / "killed"
    deadline = time.time() + 240
    finished: list[Path] = []
    while time.time() < deadline and not finished:
        time.sleep(1)
        finished = [p for p in experiment.glob("*/checkpoint_*/summary.json") if is_complete(p)]
    assert finished, f"no trial finished before the deadline (driver exit code {proc.poll()})"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=30)
    before = {p: p.stat().st_mtime_ns for p in finished}

    try:
        assert search_main(["--resume", str(experiment)]) == 0
    finally:
        ray.shutdown()
    rows = __import__("pyarrow.csv", fromlist=["read_csv"]).read_csv(experiment / "results.csv").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())  # not re-run
    assert (tmp_path / "runs" / "stats_cache").is_dir()  # the killed search's statistics were reused
    summaries = [json.loads(p.read_text()) for p in experiment.glob("*/checkpoint_*/summary.json")]
    # The dense perplexity was computed once, before or after the kill (the first pruning step
    # is cached too, but each trial's prune_percentage is its own key).
    assert sum(e["outcome"] == "computed" for s in summaries for e in s["stats_cache"] if e["kind"] == "dense_ppl") == 1


def test_a_search_trial_can_run_distributed_recovery_on_object_storage(tiny_preset, tmp_path):
    """Train-in-Tune: a trial with workers=2 launches a Ray Train FSDP run that fits beside it.

    Its epoch checkpoints go to the trial's folder on the search's storage URI, where a retry
    on another node would find them; removed once it finished. (The same on a folder is
    checked by test_search_train_in_tune.py.)"""
    from raysparse.search.runner import run_search
    from raysparse.search.settings import SearchSettings

    space = tmp_path / "space.yaml"
    space.write_text(
        "fixed:\n  model: tiny\n  method: magnitude\n  sparsity: 0.5\n  recovery: masked\n  workers: 2\n"
        "  train_samples: 16\n  max_steps: 2\n  batch_size: 8\n  eval_max_windows: 4\n"
        "params:\n  lr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    with fresh_ray(3):  # 0.5 for the trial + 2 workers
        report = run_search(SearchSettings(space=str(space), num_samples=1, cpus_per_trial=0.5,
                                           storage=(tmp_path / "runs").as_uri(), name="tit", early_stopping=False,
                                           max_failures=0))
    (row,) = report["rows"]
    assert row["status"] == "completed", row["error"]
    assert row["sparsity"] == pytest.approx(0.5, abs=1 / 64)
    summary_file = next((tmp_path / "runs" / "tit").glob("*/checkpoint_*/summary.json"))
    summary = json.loads(summary_file.read_text())
    assert summary["config"]["workers"] == 2 and summary["history"][0]["steps"] >= 1
    trial = summary_file.parent.parent
    assert summary["config"]["ray_train_storage"].endswith(f"{trial.name}/ray_train")
    assert summary["config"]["ray_train_storage"].startswith("file://")
    assert not (trial / "ray_train").exists()


SEEDED_SPACE = """
description: iterative Wanda on tiny without recovery, 2-3 ASHA milestones a trial
fixed:
  model: tiny
  method: wanda
  schedule: iterative
  sparsity: 0.5
  recovery: none
  nsamples: 8
  seqlen: 64
  eval_max_windows: 2
params:
  prune_percentage: {uniform: [0.2, 0.45]}
"""


def mid_second_trial(experiment) -> bool:
    """A trial finished and another has checkpointed an iteration (its intermediate checkpoints
    hold state.json; only a finished trial's final one holds a complete summary.json): the
    moment to kill the driver. A trial ASHA stopped also leaves only intermediate checkpoints,
    so the second may be running or just stopped; either way the third has not run."""
    started = {path.parent for path in experiment.glob("*/checkpoint_*")}
    done = {summary.parent.parent for summary in experiment.glob("*/checkpoint_*/summary.json")
            if is_complete(summary)}
    return bool(done) and bool(started - done)


def test_an_interrupted_and_resumed_search_chooses_what_an_uninterrupted_one_does(tiny_preset, tmp_path):
    """Issue 17, item 5: the same seed, the same best configuration, the same trial outcomes
    (ASHA stops some of the three), whether or not the driver was killed in the middle (after
    its first finished trial, while the second runs; whether that one then resumes from its
    checkpoint or restarts depends on Tune's last state snapshot) and resumed with --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    space = tmp_path / "space.yaml"
    space.write_text(SEEDED_SPACE)
    common = ["--space", str(space), "--num-samples", "3", "--max-concurrent", "1", "--seed", "3",
              "--grace-sparsity-pct", "20", "--no-final-eval", "--storage", str(tmp_path / "runs")]
    root = Path(__file__).resolve().parents[1]
    assert not ray.is_initialized()
    try:
        assert search_main([*common, "--name", "straight"]) == 0
    finally:
        ray.shutdown()

    driver_log = tmp_path / "cut.log"
    with driver_log.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(root / "launch" / "search.py"), *common, "--name", "cut"],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True)
    experiment = tmp_path / "runs" / "cut"
    deadline = time.time() + 300
    while time.time() < deadline and not mid_second_trial(experiment) and proc.poll() is None:
        time.sleep(0.2)
    killed_running = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    except ProcessLookupError:  # the driver's group is gone already: reported below
        pass
    proc.wait(timeout=30)
    assert killed_running, f"the driver ended (rc {proc.returncode}) before it could be interrupted: " \
                           f"{driver_log.read_text()[-2000:]}"
    try:
        assert search_main(["--resume", str(experiment)]) == 0
    finally:
        ray.shutdown()

    def outcome(name: str) -> tuple[dict, list[tuple]]:
        folder = tmp_path / "runs" / name
        rows = __import__("pyarrow.csv", fromlist=["read_csv"]).read_csv(folder / "results.csv").to_pylist()
        trials = sorted((round(r["param_prune_percentage"], 6), r["status"], round(r["val_ppl"], 4)) for r in rows)
        return json.loads((folder / "best_config.json").read_text()), trials

    straight_best, straight_trials = outcome("straight")
    cut_best, cut_trials = outcome("cut")
    assert len(straight_trials) == 3 and "stopped" in {status for _, status, _ in straight_trials}
    assert cut_trials == straight_trials
    # Iterative Wanda recomputes activations of the pruned model: every schedule ends at
    # different weights, so which trial ASHA stops and which wins is a real choice, not a tie.
    assert len({ppl for _, _, ppl in straight_trials}) == 3, straight_trials
    assert cut_best == straight_best
