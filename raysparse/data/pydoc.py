"""The `pydoc` corpus: the help topics every Python ships (`pydoc_data`), split into documents.

It is the offline default text (calibration, training, validation, test) and the `tiny`
preset's pretraining data. Three disjoint splits by document: every HELDOUT_EVERY-th document
is held out as test, another every HELDOUT_EVERY-th as validation (both unseen in
pretraining), the rest is train.
"""
from __future__ import annotations

import hashlib

from raysparse.errors import DataError

CORPUS_SPLITS = ("train", "validation", "test")

# Every HELDOUT_EVERY-th document (in sorted-key order) starting at TEST_OFFSET is the test
# split, starting at VALIDATION_OFFSET the validation split. With the 79 topics of CPython
# 3.11 each gets 10 documents (test ~38K characters, validation ~41K once the paragraphs
# they share with other splits are dropped): enough for a stable perplexity, while keeping
# ~72% of the text for train.
HELDOUT_EVERY = 8

TEST_OFFSET = 2

VALIDATION_OFFSET = 6

DOC_SEPARATOR = "\n\n"


def _pydoc_documents() -> list[tuple[str, str]]:
    """The help topics as (key, text) pairs in a fixed order, so splits are reproducible."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Python builds may drop pydoc_data
        raise DataError(
            "the tiny preset needs the standard library module pydoc_data.topics, "
            "which this Python install lacks; install a full Python build"
        ) from exc
    return [(key, topics[key]) for key in sorted(topics)]


def document_split(index: int) -> str:
    """Which split the index-th document belongs to."""
    offset = index % HELDOUT_EVERY
    return "test" if offset == TEST_OFFSET else "validation" if offset == VALIDATION_OFFSET else "train"


def pydoc_corpus_text(split: str) -> str:
    """The train, validation or test text of the pydoc corpus: whole documents joined by blank lines.

    Splitting by document (not by character offset) keeps the held-out text genuinely
    unseen: no topic contributes to two splits.
    """
    if split not in CORPUS_SPLITS:
        raise DataError(f"unknown corpus split {split!r}; valid splits are {', '.join(CORPUS_SPLITS)}")
    by_split: dict[str, list[str]] = {name: [] for name in CORPUS_SPLITS}
    for index, (_, text) in enumerate(_pydoc_documents()):
        by_split[document_split(index)].append(text)
    if split == "train":
        return DOC_SEPARATOR.join(by_split["train"])
    # Some topics repeat whole paragraphs of others (the data-model sections, for one): a
    # held-out paragraph that also stands in train (or, for validation, in test) is dropped,
    # so no 64-token span of the test text occurs in the other splits.
    seen = _paragraphs(by_split["train"])
    test = [p for p in _split_paragraphs(by_split["test"]) if p.strip() not in seen]
    if split == "test":
        return DOC_SEPARATOR.join(test)
    seen |= {p.strip() for p in test}
    return DOC_SEPARATOR.join(p for p in _split_paragraphs(by_split["validation"]) if p.strip() not in seen)


def _split_paragraphs(docs: list[str]) -> list[str]:
    return [paragraph for doc in docs for paragraph in doc.split(DOC_SEPARATOR)]


def _paragraphs(docs: list[str]) -> set[str]:
    return {paragraph.strip() for paragraph in _split_paragraphs(docs)}


def _corpus_fingerprint() -> str:
    """A hash of the corpus, recorded so a cache built on another Python is recognisable."""
    digest = hashlib.sha256()
    for key, text in _pydoc_documents():
        digest.update(key.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()
