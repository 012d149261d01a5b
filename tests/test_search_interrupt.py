"""Ctrl-C on a running search (issue 17, items 6 and 13): exit 130, the `--resume` command
printed (not Tune's `Tuner.restore`), the trials it cut labelled `interrupted`, and the live
trial table no wider than 100 columns. A separate module: the search owns its own local Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
description: interrupt test (tiny, iterative magnitude pruning, no recovery)
fixed:
  model: tiny
  method: magnitude
  schedule: iterative
  sparsity: 0.6
  eval_max_windows: 4
params:
  prune_percentage: {uniform: [0.1, 0.2]}
  magnitude_scope: {choice: [layer, global]}
"""


@pytest.mark.heavy
def test_ctrl_c_exits_130_with_the_resume_command(tiny_preset, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "search.py"), "--space", str(space), "--num-samples", "1",
             "--max-concurrent", "1", "--cpus-per-trial", "0.5", "--storage", str(tmp_path / "runs"), "--name", "s",
             "--no-final-eval", "--no-cache", "--no-early-stopping"],
            stdout=stdout, stderr=stderr, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 240
            # Interrupt once a trial has reported an iteration (its progress.csv has a row).
            while time.monotonic() < deadline and proc.poll() is None:
                progress = list((tmp_path / "runs" / "s").glob("*/progress.csv"))
                if any(len(p.read_text().splitlines()) > 1 for p in progress):
                    break
                time.sleep(1)
            assert proc.poll() is None, "the search ended before it could be interrupted"
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout_text, stderr_text = out.read_text(), err.read_text()
    assert code == 130, stderr_text[-3000:]
    experiment = tmp_path / "runs" / "s"
    assert f"python launch/search.py --resume {experiment}" in stderr_text
    assert "Tuner.restore" not in stdout_text + stderr_text
    rows = [line for line in stdout_text.splitlines()
            if len(line.split()) > 1 and line.split()[1] in ("completed", "stopped", "interrupted", "error")]
    assert rows and any(line.split()[1] == "interrupted" for line in rows), stdout_text[-3000:]
    assert not any(line.split()[1] == "stopped" for line in rows)  # no early stopping: nothing was cut by ASHA
    table = [line for line in stdout_text.splitlines() if line.startswith(("| ", "+-"))]
    assert table, stdout_text[-3000:]
    assert max(len(line) for line in table) <= 100, max(table, key=len)


def test_the_preset_is_built_in_the_driver_and_announced_first(monkeypatch, capsys):  # item 13
    from raysparse.models import tiny
    from raysparse.search import runner
    from raysparse.search.space_file import load_space

    built = []
    monkeypatch.setattr(tiny, "tiny_model_is_built", lambda: False)
    monkeypatch.setattr(tiny, "ensure_tiny_model", lambda: built.append(True))
    runner.build_presets_first(load_space(ROOT / "search_spaces" / "default.yaml"))
    assert built == [True]
    assert capsys.readouterr().out.count("\n") == 1  # one line, then the build's own progress bar
    built.clear()
    runner.build_presets_first(load_space(ROOT / "search_spaces" / "imp_opt125m.yaml"))  # a hub model: no build
    assert built == []


@pytest.mark.parametrize("space", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_trial_table_is_planned_within_100_columns(space):  # item 13, for every shipped space
    from raysparse.search.console import _FIXED_COLUMNS, _METRIC_COLUMNS, TABLE_WIDTH, _column_width, trial_table
    from raysparse.search.settings import SearchSettings
    from raysparse.search.space_file import load_space

    loaded = load_space(space)
    reporter = trial_table(loaded, SearchSettings())
    from raysparse.search.console import _param_width

    width = 1 + sum(_column_width(head, widest) for head, widest in _FIXED_COLUMNS + list(_METRIC_COLUMNS.values()))
    width += sum(_column_width(head, _param_width(loaded.params[name]))
                 for name, head in reporter._parameter_columns.items())
    assert 0 < len(reporter._parameter_columns) and width <= TABLE_WIDTH
