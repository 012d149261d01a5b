import json

import pytest
import torch
from conftest import SAMPLE_TEXT, build_tokenizer

from raysparse.data.sources import calibration_windows, load_text, resolve_source, token_stream
from raysparse.errors import DataError


def test_missing_file_names_the_path_and_the_alternatives(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.txt.*wikitext2, c4, ptb"):
        resolve_source(str(tmp_path / "nope.txt"), "calibration")


def test_jsonl_documents_are_joined_and_bad_records_named(tmp_path):
    good = tmp_path / "c4.jsonl"
    good.write_text(json.dumps({"text": "first doc"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    assert load_text(resolve_source(str(good), "calibration")) == "first doc\n\nsecond"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1 has no 'text' field"):
        load_text(resolve_source(str(bad), "calibration"))


def test_named_datasets_map_roles_to_the_papers_splits():
    assert resolve_source("wikitext2", "test").split == "test"
    assert resolve_source("c4", "test").split == "validation"
    assert resolve_source("c4", "calibration").split == "train"


def test_unreachable_hub_dataset_says_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="pass a local file"):
        load_text(resolve_source("ptb", "test"))


def test_calibration_windows_are_seeded():
    stream = torch.arange(1000)
    a = calibration_windows(stream, 8, 32, seed=0)
    assert a.shape == (8, 32)
    assert torch.equal(a, calibration_windows(stream, 8, 32, seed=0))
    assert not torch.equal(a, calibration_windows(stream, 8, 32, seed=1))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows of the stream


def test_too_short_calibration_text_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window of 64"):
        calibration_windows(torch.arange(50), 4, 64, seed=0)


def test_token_stream_is_cached_per_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "t.txt"
    path.write_text(SAMPLE_TEXT)
    tok = build_tokenizer()
    first = token_stream(tok, resolve_source(str(path), "test"))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 1
    assert torch.equal(first, token_stream(tok, resolve_source(str(path), "test")))
    other = build_tokenizer(vocab_size=280)
    token_stream(other, resolve_source(str(path), "test"))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 2
