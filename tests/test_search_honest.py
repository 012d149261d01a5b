"""No decision of a search reads test data: an adversarial test text changes no choice.

Two searches with the same seed, the same validation text and different test texts (the
second one's words reversed, so its perplexities rank configurations differently) must
choose the same configuration with the same validation numbers; only the test perplexity
reported for the chosen configuration differs.
"""
import pytest
import ray
from conftest import fresh_ray

from raysparse.data.pydoc import pydoc_corpus_text
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
  val_data: {val}
  eval_data: {test}
params:
  prune_percentage: {{uniform: [0.25, 0.45]}}
  lr: {{loguniform: [1.0e-4, 3.0e-3]}}
"""


def test_a_test_file_without_validation_text_is_refused_before_ray_starts(tmp_path):
    test_file = tmp_path / "test.txt"
    test_file.write_text(pydoc_corpus_text("test"))
    space = tmp_path / "space.yaml"
    space.write_text(f"fixed: {{model: tiny, eval_data: {test_file}}}\nparams: {{lr: {{loguniform: [1.0e-4, 1.0e-3]}}}}\n")
    with pytest.raises(ConfigError, match="names no val_data: a search decides on validation text only"):
        run_search(SearchSettings(space=str(space), storage=str(tmp_path / "runs")))
    assert not ray.is_initialized()


@pytest.mark.slow
def test_an_adversarial_test_text_changes_no_decision(tiny_preset, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text(pydoc_corpus_text("validation"))
    honest, adversarial = tmp_path / "test.txt", tmp_path / "test-reversed.txt"
    text = pydoc_corpus_text("test")
    honest.write_text(text)
    adversarial.write_text("\n".join(" ".join(reversed(line.split())) for line in text.splitlines()))
    reports = {}
    with fresh_ray():
        for name, test in (("honest", honest), ("adversarial", adversarial)):
            space = tmp_path / f"{name}.yaml"
            space.write_text(SPACE.format(val=val, test=test))
            reports[name] = run_search(SearchSettings(
                space=str(space), num_samples=3, max_concurrent=2, storage=str(tmp_path / "runs"), name=name,
                searcher="random", seed=1, early_stopping=False, max_failures=0))
    a, b = reports["honest"], reports["adversarial"]
    params = [{k: v for k, v in r.items() if k.startswith("param_")} for r in a["rows"]]
    assert params == [{k: v for k, v in r.items() if k.startswith("param_")} for r in b["rows"]]
    assert [r["val_ppl"] for r in a["rows"]] == pytest.approx([r["val_ppl"] for r in b["rows"]], rel=1e-6)
    best_a, best_b = a["best"], b["best"]
    assert {k: v for k, v in best_a.items() if k.startswith("param_")} == \
        {k: v for k, v in best_b.items() if k.startswith("param_")}
    # The test number is reported for the chosen configuration only, and it does depend on the test text.
    assert [r.get("test_ppl") is not None for r in a["rows"]].count(True) == 1
    assert best_a["test_ppl"] != pytest.approx(best_b["test_ppl"], rel=1e-3)
    # The re-run reproduces the chosen trial's validation perplexity exactly (same seed).
    assert best_a["val_ppl_rerun"] == pytest.approx(best_a["val_ppl"], rel=1e-4)
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(f"{a['experiment']}/results.csv").to_pylist()
    assert {"val_ppl", "test_ppl"} <= set(table[0])
