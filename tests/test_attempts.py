"""Attempt records and finished-trial detection (no Ray): what the results table relies on."""
import json

from raysparse.search.attempts import finished_summary, last_attempt, record_attempt


def test_each_start_counts_and_a_resume_names_its_checkpointed_iteration(tmp_path):
    output = tmp_path / "trial"
    first = record_attempt(output, "node-a")
    assert first == {"attempt": 1, "node_id": "node-a", "resumed_after": 0}
    (output / "checkpoint").mkdir()
    (output / "checkpoint" / "state.json").write_text(json.dumps({"completed": 3}))
    second = record_attempt(output, "node-b")
    assert second == {"attempt": 2, "node_id": "node-b", "resumed_after": 3}
    assert last_attempt(output) == second


def test_a_finished_summary_is_reused_only_for_the_same_settings(tmp_path):
    config = {"model": "tiny", "lr": 0.001, "output": str(tmp_path), "stats_cache": None}
    summary = {"status": "completed", "history": [{"iteration": 1}], "config": dict(config, output="/elsewhere")}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_summary(tmp_path, config) == summary  # output differs: ignored, as for resume
    assert finished_summary(tmp_path, dict(config, lr=0.002)) is None
    (tmp_path / "summary.json").write_text(json.dumps(dict(summary, status="failed")))
    assert finished_summary(tmp_path, config) is None
