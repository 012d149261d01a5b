"""The cache inside real searches on object storage (a file:// URI: the pyarrow code path of
s3:// and gs://): each key computed once across trials, a second search over the same
storage computes nothing, and launch/prune.py reuses the persisted entries without Ray."""
import json
from pathlib import Path

import pytest
from conftest import fresh_ray

from raysparse.cli.prune import prune_main
from raysparse.search.runner import run_search
from raysparse.search.settings import SearchSettings

pytestmark = pytest.mark.slow

# One-shot pruning + LoRA: trials that differ only in lr share their pruning step.
SPACE = """
fixed:
  model: tiny
  schedule: oneshot
  sparsity: 0.5
  recovery: lora
  nsamples: 8
  train_samples: 16
  max_steps: 2
  batch_size: 8
  eval_max_windows: 4
params:
  method: {choice: [wanda, magnitude]}
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


@pytest.fixture(scope="module")
def local_ray(tiny_preset):
    with fresh_ray():
        yield


def search(folder: Path, space_text: str, name: str, samples: int) -> dict:
    space = folder / f"{name}.yaml"
    space.write_text(space_text)
    return run_search(SearchSettings(space=str(space), num_samples=samples, max_concurrent=2,
                                     storage=(folder / "bucket").as_uri(), name=name, searcher="random", seed=1,
                                     early_stopping=False, max_failures=0))


def test_searches_compute_each_key_once_and_prune_reuses_the_entries(local_ray, tmp_path):
    first = search(tmp_path, SPACE, "first", 4)
    assert [r["status"] for r in first["rows"]] == ["completed"] * 4
    methods = {r["param_method"] for r in first["rows"]}
    by_kind = first["cache"]["by_kind"]
    # Dense validation ppl: 1 key for all 4 trials and the final re-run; test ppl: 1 key (final re-run).
    assert (by_kind["dense_ppl"]["computed"], by_kind["dense_ppl"]["served"]) == (2, 4)
    # One pruning per distinct method, whatever the lr; the final re-run is served its masks.
    assert (by_kind["prune_masks"]["computed"], by_kind["prune_masks"]["served"]) == (len(methods), 5 - len(methods))
    stored = tmp_path / "bucket" / "stats_cache"
    assert {p.suffix for p in stored.iterdir()} == {".json", ".safetensors"}  # no pickles
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "bucket" / "first").glob("*/checkpoint_*/summary.json")]
    assert len(summaries) == 4
    assert sum(s["stats_cache_by_kind"]["dense_ppl"]["computes"] for s in summaries) == 1
    assert all(s["stats_cache_by_kind"]["prune_masks"]["hits"] + s["stats_cache_by_kind"]["prune_masks"]["computes"]
               == 1 for s in summaries)

    method = sorted(methods)[0]
    second_space = SPACE.replace("  method: {choice: [wanda, magnitude]}\n", "").replace(
        "fixed:\n", f"fixed:\n  method: {method}\n")
    second = search(tmp_path, second_space, "second", 2)
    assert second["cache"]["misses"] == 0, second["cache"]  # everything read back from storage
    assert second["cache"]["by_kind"]["dense_ppl"]["read_from_storage"] >= 1

    out = tmp_path / "rerun"
    assert prune_main(["--config", second["best_config"], "--stats-cache", f"{(tmp_path / 'bucket').as_uri()}/stats_cache",
                       "--output", str(out), "-q"]) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert {e["kind"]: e["outcome"] for e in rerun["stats_cache"]} == {"dense_ppl": "hit", "prune_masks": "hit"}
    assert [e["outcome"] for e in rerun["stats_cache"]].count("hit") == 3  # validation, test, masks
