"""Three roles for data, never mixed: calibration/training, validation (decisions), test (report)."""
import json

import pytest
import torch

from raysparse.cli.prune import prune_main
from raysparse.data import pydoc
from raysparse.data.overlap import shared_fraction
from raysparse.data.sources import resolve_source
from raysparse.errors import ConfigError, DataError
from raysparse.metrics.perplexity import perplexity
from raysparse.models.loading import load_model
from raysparse.trial.runner import run_trial


def test_named_datasets_map_each_role_to_its_own_split():
    assert resolve_source("wikitext2", "validation").split == "validation"
    assert resolve_source("wikitext2", "test").split == "test"
    assert resolve_source("wikitext2", "calibration").split == "train"
    assert resolve_source("c4", "test").split == "validation"  # the papers' C4 evaluation shard
    assert resolve_source("c4", "validation").split == "validation-heldout"  # other documents of it
    assert resolve_source("pydoc", "validation").split == "validation"


def test_pydoc_splits_share_no_paragraph():
    texts = {split: pydoc.pydoc_corpus_text(split) for split in pydoc.CORPUS_SPLITS}
    paragraphs = {split: {p.strip() for p in text.split(pydoc.DOC_SEPARATOR) if p.strip()}
                  for split, text in texts.items()}
    assert not paragraphs["test"] & paragraphs["train"]
    assert not paragraphs["validation"] & paragraphs["train"]
    assert not paragraphs["validation"] & paragraphs["test"]
    assert all(len(text) > 30_000 for text in texts.values())


def test_shared_fraction_sees_contained_text_and_not_disjoint_text():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (5000,), generator=generator), torch.randint(0, 1000, (5000,), generator=generator)
    assert shared_fraction(a, a) == 1.0
    assert shared_fraction(torch.cat([b, a[:2500]]), a) == pytest.approx(0.5, abs=0.02)
    assert shared_fraction(b, a) == 0.0


def test_the_same_text_for_validation_and_test_is_refused(text_files, tmp_path):
    with pytest.raises(ConfigError, match="--val-data and --eval-data both name"):
        run_trial({"eval_data": str(text_files["eval"]), "val_data": str(text_files["eval"])})
    spelled_otherwise = tmp_path / "sub" / ".." / "eval.txt"
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="both name"):
        run_trial({"eval_data": str(text_files["eval"]), "val_data": str(spelled_otherwise)})


def test_a_test_file_without_validation_text_is_refused_when_the_trial_decides(saved_model_dir, text_files):
    config = {"model": str(saved_model_dir()), "calib_data": str(text_files["calib"]),
              "eval_data": str(text_files["eval"]), "method": "magnitude", "recovery": "masked",
              "seqlen": 32, "eval_seqlen": 32, "train_samples": 4, "max_steps": 1}
    with pytest.raises(ConfigError, match="add --val-data PATH"):
        run_trial(config)


def test_overlapping_validation_and_test_text_is_refused(saved_model_dir, text_files, tmp_path):
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(text_files["val"].read_text() + text_files["eval"].read_text())
    with pytest.raises(DataError, match="of the test text's 64-token spans .* also occur in the validation text"):
        run_trial({"model": str(saved_model_dir()), "calib_data": str(text_files["calib"]), "method": "magnitude",
                   "eval_data": str(text_files["eval"]), "val_data": str(leaky), "eval_seqlen": 32})


def test_validation_text_shorter_than_a_window_is_one_line(saved_model_dir, text_files, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    model_dir = saved_model_dir()
    capsys.readouterr()  # saving the fixture's model writes progress bars
    code = prune_main(["--model", str(model_dir), "--method", "magnitude", "--eval-seqlen", "32",
                       "--calib-data", str(text_files["calib"]), "--eval-data", str(text_files["eval"]),
                       "--val-data", str(short), "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "validation text" in err[0] and "fewer than one evaluation window" in err[0]


def test_decisions_read_validation_and_the_report_reads_test(saved_model_dir, text_files, tmp_path):
    model_dir = saved_model_dir()
    out = tmp_path / "out"
    summary = run_trial({"model": str(model_dir), "method": "magnitude", "sparsity": 0.5, "recovery": "masked",
                         "lr": 1e-3, "train_samples": 8, "max_steps": 2, "epochs_per_iteration": 2,
                         "calib_data": str(text_files["calib"]), "val_data": str(text_files["val"]),
                         "eval_data": str(text_files["eval"]), "seqlen": 32, "eval_seqlen": 32, "train_seqlen": 32,
                         "output": str(out), "save": True}).summary
    record = summary["history"][-1]
    # The kept state is the best on validation: the pre-training baseline or an epoch's
    # validation perplexity, whichever is lowest (keep_best).
    candidates = [record["ppl_after_prune"]] + [e["ppl"] for e in record["epochs"]]
    assert record["ppl_after_train"] == pytest.approx(min(candidates), rel=1e-6)
    loaded = load_model(str(out / "model"))
    from raysparse.data.sources import token_stream

    def ppl_on(name):
        stream = token_stream(loaded.tokenizer, resolve_source(str(text_files[name]), "test"))
        return perplexity(loaded.model, stream, 32, progress=False).ppl

    assert summary["val"]["ppl_final"] == pytest.approx(ppl_on("val"), rel=1e-5)
    assert summary["ppl_final"] == pytest.approx(ppl_on("eval"), rel=1e-5)
    assert summary["ppl_final"] != pytest.approx(summary["val"]["ppl_final"], rel=1e-3)
    assert summary["ppl_dense"] is not None and summary["val"]["ppl_dense"] is not None
    saved = json.loads((out / "summary.json").read_text())
    assert saved["protocol"]["val_data"].endswith("val.txt") and saved["protocol"]["test_reported"] is True


def test_report_test_off_never_evaluates_the_test_text(saved_model_dir, text_files):
    summary = run_trial({"model": str(saved_model_dir()), "method": "magnitude", "report_test": False,
                         "calib_data": str(text_files["calib"]), "val_data": str(text_files["val"]),
                         "eval_data": str(text_files["eval"]), "eval_seqlen": 32}).summary
    assert summary["ppl_dense"] is None and summary["ppl_final"] is None and summary["ppl_pruned"] is None
    assert summary["val"]["ppl_final"] > 0
    assert "eval_test" not in summary["timings_s"]
