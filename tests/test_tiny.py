"""The tiny preset: corpus split, cache/lock behaviour (with a fake builder), and the real build.

Tests marked slow share the session-wide `tiny_preset` fixture, so the ~2-minute
pretraining happens at most once per cache folder.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from raysparse.data import pydoc
from raysparse.data.pydoc import pydoc_corpus_text
from raysparse.errors import DataError
from raysparse.models import tiny, tiny_pretrain
from raysparse.models.tiny import (
    TINY_DIRNAME,
    TINY_FORMAT_VERSION,
    TINY_INFO_FILE,
    TINY_PRESET_NAME,
    ensure_tiny_model,
    read_tiny_info,
)
from raysparse.models.tiny_pretrain import TinyPretrainConfig, stream_perplexity

# ---------------------------------------------------------------- corpus (fast)


def test_preset_name():
    assert TINY_PRESET_NAME == "tiny"


def test_corpus_split_is_deterministic_and_sized():
    train, test = pydoc_corpus_text("train"), pydoc_corpus_text("test")
    assert train == pydoc_corpus_text("train")
    assert test == pydoc_corpus_text("test")
    assert len(test) > 30_000, "held-out text too small for a stable perplexity"
    assert len(train) > 5 * len(test)


def test_corpus_split_is_disjoint_by_document():
    from pydoc_data.topics import topics

    train = pydoc_corpus_text("train")
    held_out = pydoc_corpus_text("validation") + pydoc_corpus_text("test")
    in_train = [text in train for text in topics.values()]
    # Whole documents go to train; the held-out splits take the others (minus the paragraphs
    # they share with train), so no held-out topic is in train and train keeps most of them.
    assert 0 < len(topics) - sum(in_train) < sum(in_train)
    for text, trained in zip(topics.values(), in_train):
        if not trained:
            assert text[:200] not in train or text[:200].strip() == ""
    assert held_out and not any(p.strip() and p.strip() in train.split(pydoc.DOC_SEPARATOR)
                                for p in held_out.split(pydoc.DOC_SEPARATOR))


def test_unknown_split_raises_data_error_naming_valid_ones():
    with pytest.raises(DataError, match="train, validation, test"):
        pydoc_corpus_text("dev")


def test_lr_schedule_warms_up_then_decays_to_floor():
    config = TinyPretrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [tiny_pretrain._lr_factor(step, config) for step in range(config.steps)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


# ---------------------------------------------------------------- cache and lock (fast, fake builder)


@pytest.fixture
def fake_builder(monkeypatch):
    """Replace the two-minute build with one that writes the same files and counts calls."""
    calls: list[Path] = []

    def build(out_dir: Path, config: TinyPretrainConfig | None = None) -> dict:
        calls.append(Path(out_dir))
        time.sleep(0.2)  # long enough for concurrent callers to pile up on the lock
        for name in tiny._REQUIRED_FILES:
            (Path(out_dir) / name).write_text("{}")
        info = {"format_version": TINY_FORMAT_VERSION, "heldout_ppl": 1.0}
        (Path(out_dir) / TINY_INFO_FILE).write_text(json.dumps(info))
        return info

    monkeypatch.setattr(tiny, "build_tiny_model", build)
    return calls


def test_concurrent_callers_build_once(tmp_path, fake_builder):
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_tiny_model(tmp_path))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(fake_builder) == 1
    assert set(results) == {tmp_path / TINY_DIRNAME}
    # Only the finished folder and the lock file remain: no scratch folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY_DIRNAME, f"{TINY_DIRNAME}.lock"]


def test_incomplete_folder_and_stale_scratch_are_replaced(tmp_path, fake_builder):
    half = tmp_path / TINY_DIRNAME
    half.mkdir()
    (half / "config.json").write_text("{}")  # a crash before tiny_info.json was written
    (tmp_path / f".{TINY_DIRNAME}.building-crashed").mkdir()
    folder = ensure_tiny_model(tmp_path)
    assert folder == half
    assert len(fake_builder) == 1
    assert read_tiny_info(folder) is not None
    assert not list(tmp_path.glob(".*"))


def test_force_rebuilds(tmp_path, fake_builder):
    ensure_tiny_model(tmp_path)
    ensure_tiny_model(tmp_path)
    assert len(fake_builder) == 1
    ensure_tiny_model(tmp_path, force=True)
    assert len(fake_builder) == 2


def test_info_from_another_format_counts_as_missing(tmp_path):
    (tmp_path / TINY_INFO_FILE).write_text(json.dumps({"format_version": TINY_FORMAT_VERSION + 1}))
    assert read_tiny_info(tmp_path) is None
    (tmp_path / TINY_INFO_FILE).write_text("{not json")
    assert read_tiny_info(tmp_path) is None


# ---------------------------------------------------------------- the real preset (slow, built once)


@pytest.mark.slow
def test_preset_loads_with_auto_classes(tiny_preset):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_preset)
    tokenizer = AutoTokenizer.from_pretrained(tiny_preset)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) <= 1_000_000
    for special in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, special) is not None
    # Plain encoding: no BOS prepended, and text round-trips through the byte-level BPE.
    text = "def f(x):\n    return x  # café"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_preset_uses_grouped_query_attention(tiny_preset):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_preset)
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.tie_word_embeddings


@pytest.mark.slow
def test_recorded_heldout_perplexity_is_good_and_reproducible(tiny_preset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_tiny_info(tiny_preset)
    assert info is not None
    ppl = info["heldout_ppl"]
    assert math.isfinite(ppl)
    assert 1.0 < ppl < 60.0, f"held-out perplexity {ppl} is poor for vocab {info['vocab_size']}"
    assert info["steps"] > 0 and math.isfinite(info["final_train_loss"])
    # The saved weights reproduce the recorded number (the save/load round trip is exact).
    model = AutoModelForCausalLM.from_pretrained(tiny_preset)
    tokenizer = AutoTokenizer.from_pretrained(tiny_preset)
    stream = torch.tensor(tokenizer(pydoc_corpus_text("test"))["input_ids"])
    assert stream_perplexity(model, stream, info["heldout_window"]) == pytest.approx(ppl, rel=1e-3)


@pytest.mark.slow
def test_second_call_reuses_the_cache(tiny_preset):
    watched = [tiny_preset / TINY_INFO_FILE, tiny_preset / "model.safetensors"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert ensure_tiny_model() == tiny_preset
    assert ensure_tiny_model(tiny_preset.parent) == tiny_preset
    assert [p.stat().st_mtime_ns for p in watched] == before
