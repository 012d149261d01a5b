"""A search on object storage: trial checkpoints (through Tune) and results reach the storage
URI, and --resume works from the URI. A file:// URI runs the same pyarrow/Tune code path as
s3:// or gs://."""
import json
from pathlib import Path

import pytest
from conftest import fresh_ray

from raysparse.cluster.storage import check_writable, delete_dir, list_dirs, read_text, upload_dir
from raysparse.errors import ConfigError
from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings

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
  prune_percentage: {uniform: [0.3, 0.45]}
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


def test_the_driver_writes_lists_and_deletes_folders_on_a_storage_uri(tmp_path):
    local = tmp_path / "local"
    (local / "plots").mkdir(parents=True)
    (local / "results.csv").write_text("trial_id\n")
    uri = (tmp_path / "bucket").as_uri() + "/exp"
    upload_dir(local, uri)
    assert read_text(uri + "/results.csv") == "trial_id\n" and read_text(uri + "/nothing.json") is None
    assert list_dirs(uri) == ["plots"] and list_dirs(uri + "/missing") == []
    delete_dir(uri + "/plots")
    delete_dir(uri + "/missing")
    assert list_dirs(uri) == []


def test_unwritable_storage_is_refused_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="cannot be written"):
        check_writable("file:///proc/raysparse")


@pytest.mark.slow
@pytest.mark.heavy  # object storage inside searches stays in the default run: test_cache_search
def test_a_search_on_a_storage_uri_uploads_trials_and_results_and_resumes_from_it(tiny_preset, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    bucket = tmp_path / "bucket"
    storage = bucket.as_uri()
    with fresh_ray():
        report = run_search(SearchSettings(space=str(space), num_samples=2, max_concurrent=2, storage=storage,
                                           name="t", searcher="random", early_stopping=False, max_failures=0))
        resumed = run_search(SearchSettings(), resume=f"{storage}/t")
    assert report["experiment"] == f"{storage}/t"
    assert [r["status"] for r in report["rows"]] == ["completed", "completed"]
    assert (bucket / "t" / "results.csv").is_file() and (bucket / "t" / "best_config.json").is_file()
    # Each trial's final report carries its finished output as a Tune checkpoint, on storage.
    summaries = sorted(bucket.glob("t/*/checkpoint_*/summary.json"))
    assert len(summaries) == 2
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed" and summary["iterations"] >= 2
        assert [a["attempt"] for a in summary["attempts"]] == [1] and summary["attempts"][0]["node_id"]
        trial = path.parent.parent
        # Iteration checkpoints went the same way; Tune keeps the newest two of each trial.
        assert 1 <= len(list(trial.glob("checkpoint_*"))) <= 2 and not (trial / "ray_train").exists()
        assert not (trial / "trial").exists()  # the working folder stays on the node, off storage
    rows = {Path(r["path"]).name: r for r in report["rows"]}
    for path in summaries:
        summary = json.loads(path.read_text())
        row = rows[path.parent.parent.name]
        assert (row["attempt"], row["resumed_after"]) == (1, 0)
        assert row["train_steps_total"] == summary["train_steps_total"] == sum(h["steps"] for h in summary["history"])
    assert Path(report["local_copy"]).is_dir()
    assert [r["status"] for r in resumed["rows"]] == ["completed", "completed"]
    assert {r["val_ppl"] for r in resumed["rows"]} == {r["val_ppl"] for r in report["rows"]}
