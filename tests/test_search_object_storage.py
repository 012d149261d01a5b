"""A search on object storage: trial folders and results reach the storage URI, and --resume
works from the URI. A file:// URI runs the same pyarrow/Tune code path as s3:// or gs://."""
import json
from pathlib import Path

import pytest
import ray

from raysparse.cluster.storage import check_writable, download_dir, upload_dir
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


def test_folders_round_trip_through_a_storage_uri(tmp_path):
    local = tmp_path / "local"
    (local / "checkpoint").mkdir(parents=True)
    (local / "checkpoint" / "state.json").write_text('{"completed": 2}')
    uri = (tmp_path / "bucket").as_uri() + "/exp/trial_1/trial"
    upload_dir(local, uri)
    assert download_dir(uri, tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "checkpoint" / "state.json").read_text() == '{"completed": 2}'
    assert not download_dir((tmp_path / "bucket").as_uri() + "/nothing", tmp_path / "x")


def test_unwritable_storage_is_refused_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="cannot be written"):
        check_writable("file:///proc/raysparse")


@pytest.mark.slow
def test_a_search_on_a_storage_uri_uploads_trials_and_results_and_resumes_from_it(tiny_preset, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    bucket = tmp_path / "bucket"
    storage = bucket.as_uri()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_search(SearchSettings(space=str(space), num_samples=2, max_concurrent=2, storage=storage,
                                           name="t", searcher="random", early_stopping=False, max_failures=0))
        resumed = run_search(SearchSettings(), resume=f"{storage}/t")
    finally:
        ray.shutdown()
    assert report["experiment"] == f"{storage}/t"
    assert [r["status"] for r in report["rows"]] == ["completed", "completed"]
    assert (bucket / "t" / "results.csv").is_file() and (bucket / "t" / "best_config.json").is_file()
    summaries = sorted(bucket.glob("t/*/trial/summary.json"))  # uploaded by each trial (Tune artifacts)
    assert len(summaries) == 2
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed" and summary["iterations"] >= 2
        assert (path.parent / "attempts.json").is_file()
    assert Path(report["local_copy"]).is_dir()
    assert [r["status"] for r in resumed["rows"]] == ["completed", "completed"]
    assert {r["final_ppl"] for r in resumed["rows"]} == {r["final_ppl"] for r in report["rows"]}
