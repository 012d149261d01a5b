"""Zero-shot accuracy through the real lm-evaluation-harness (issue 14): the shipped offline
last-word tasks, in a trial (dense, pruned, structurally shrunk, LoRA) and as a search objective."""
from __future__ import annotations

import json

import pytest
from conftest import fresh_ray, shared_path

from raysparse.cli.prune import prune_main
from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.search.results import best_row, pareto_front
from raysparse.tasks.lastword import lastword_documents, tinystories_splits
from raysparse.trial.runner import run_trial

pytest.importorskip("lm_eval")

PYDOC_TASK = "raysparse_lastword_pydoc"

STORIES_TASK = "raysparse_lastword_tinystories"


def test_last_word_passages_end_in_a_word_their_context_holds():
    text = " ".join(f"word{i}" for i in range(40)) + " alpha beta gamma delta alpha. " + "filler " * 5
    docs = lastword_documents(text + "\n\n" + "the cat sat on the mat and the dog saw the cat")
    assert docs, "no passage was found"
    for doc in docs:
        *context, last = doc.split(" ")
        assert last.isalpha() and len(last) >= 3
        assert last.lower() in {w.strip(".,").lower() for w in context}
    assert docs[0].endswith("delta alpha")  # trailing punctuation dropped, the passage ends at its first repeat


def test_tinystories_validation_and_test_passages_are_disjoint():
    text = shared_path("tinystories_valid", "tinystories_val.txt").read_text(encoding="utf-8")
    splits = tinystories_splits(text)
    assert splits["validation"] and splits["test"]
    assert not set(lastword_documents(splits["validation"])) & set(lastword_documents(splits["test"]))
    assert splits["validation"][:2000] not in text[: len(text) // 2]  # the calibration half holds neither


def test_pareto_and_best_respect_a_maximised_metric():
    rows = [{"val_ppl": 10, "val_zeroshot_acc": 0.5}, {"val_ppl": 9, "val_zeroshot_acc": 0.4},
            {"val_ppl": 11, "val_zeroshot_acc": 0.3}]
    assert pareto_front(rows, ["val_ppl", "val_zeroshot_acc"], ["min", "max"]) == rows[:2]
    assert best_row(rows, "val_zeroshot_acc", "max") is rows[0]


def test_a_task_folder_needs_tasks_and_must_exist():  # names and datasets: tests/test_bad_input.py
    with pytest.raises(ConfigError, match="eval-tasks-path"):
        TrialConfig(eval_tasks_path="/nonexistent").validate()
    with pytest.raises(ConfigError, match="not a folder"):
        TrialConfig(eval_tasks="arc_easy", eval_tasks_path="/nonexistent").validate()


@pytest.mark.slow
def test_accuracy_is_above_chance_dense_and_drops_at_80_percent_on_stories260k(tmp_path):
    model_dir = shared_path("stories260K", "hf")
    text = shared_path("tinystories_valid", "tinystories_val.txt").read_text(encoding="utf-8")
    evaluation, calib = tmp_path / "eval.txt", tmp_path / "calib.txt"
    evaluation.write_text(text[3 * len(text) // 4:], encoding="utf-8")
    calib.write_text(text[: len(text) // 2], encoding="utf-8")  # the task's passages are in the second half
    summary = run_trial(TrialConfig(model=str(model_dir), method="magnitude", sparsity="0.8",
                                    eval_data=str(evaluation), calib_data=str(calib), eval_seqlen=256, eval_max_windows=4,
                                    eval_tasks=STORIES_TASK, eval_tasks_limit=60)).summary
    zeroshot = summary["zeroshot"]
    # Chance is about 1 in 512 (the vocabulary); the dense model gets ~40% of these words.
    assert zeroshot["val"]["acc_dense"] > 0.2 and zeroshot["acc_dense"] > 0.2
    assert zeroshot["val"]["acc_final"] < zeroshot["val"]["acc_dense"] - 0.15
    assert zeroshot["acc_final"] < zeroshot["acc_dense"] - 0.15
    assert zeroshot["val_final"]["tasks"][STORIES_TASK]["split"] == "validation"
    assert zeroshot["test_final"]["tasks"][STORIES_TASK]["split"] == "test"
    assert zeroshot["test_final"]["tasks"][STORIES_TASK]["documents"] == 60
    assert summary["history"][-1]["val_zeroshot_acc"] == zeroshot["val"]["acc_final"]
    protocol = summary["protocol"]["zeroshot"]
    assert protocol["lm_eval"] and protocol["tasks"][STORIES_TASK]["version"] == 1.0


@pytest.mark.slow
def test_a_structurally_shrunk_model_with_lora_evaluates(tiny_preset, tmp_path):
    summary = run_trial(TrialConfig(method="structured", pruning_ratio=0.25, num_examples=4, eval_max_windows=4,
                                    recovery="lora", train_samples=8, max_steps=2, batch_size=4,
                                    report_test=False, eval_tasks=PYDOC_TASK, eval_tasks_limit=16)).summary
    assert summary["structured"]["params_after"] < summary["structured"]["params_before"]
    final = summary["zeroshot"]["val_final"]["tasks"][PYDOC_TASK]
    assert final["documents"] == 16 and 0.0 <= final["acc"] <= 1.0
    assert summary["zeroshot"]["test_final"] is None  # report_test off: no test split read


SPACE = """
description: zero-shot objective (tiny, one-shot magnitude, 2 trials)
fixed:
  model: tiny
  method: magnitude
  eval_max_windows: 4
  eval_tasks: raysparse_lastword_pydoc
  eval_tasks_limit: 24
params:
  sparsity: {choice: [0.3, 0.8]}
"""


@pytest.mark.slow
def test_a_zeroshot_search_picks_by_accuracy_and_its_best_config_reruns(tiny_preset, tmp_path):

    from raysparse.search.runner import run_search
    from raysparse.search.settings import SearchSettings

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with fresh_ray():
        report = run_search(SearchSettings(space=str(space), num_samples=2, max_concurrent=2, searcher="random",
                                           storage=str(tmp_path / "runs"), name="zs", seed=0, objective="zeroshot_acc",
                                           early_stopping=False, max_failures=0))
    done = [r for r in report["rows"] if r["status"] == "completed"]
    assert len(done) == 2 and all(r["val_zeroshot_acc"] is not None for r in done)
    best = report["best"]
    assert best["val_zeroshot_acc"] == max(r["val_zeroshot_acc"] for r in done)
    assert best["test_zeroshot_acc"] is not None  # the final evaluation read the test split
    rerun_dir = tmp_path / "rerun"
    assert prune_main(["--config", report["best_config"], "--output", str(rerun_dir), "-q"]) == 0
    rerun = json.loads((rerun_dir / "summary.json").read_text())
    assert rerun["zeroshot"]["val"]["acc_final"] == pytest.approx(best["val_zeroshot_acc"], abs=1e-9)
    csv = (tmp_path / "runs" / "zs" / "results.csv").read_text()
    assert "val_zeroshot_acc" in csv.splitlines()[0]
