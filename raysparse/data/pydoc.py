"""The `pydoc` corpus: the help topics every Python ships (`pydoc_data`), split into documents.

It is the offline default text (calibration, evaluation, training) and the `tiny` preset's
pretraining data; every TEST_EVERY-th document is held out as the test split.
"""
from __future__ import annotations

import hashlib

from raysparse.errors import DataError

CORPUS_SPLITS = ("train", "test")

# Every TEST_EVERY-th document (in sorted-key order), starting at TEST_OFFSET, is held
# out. With the 79 topics of CPython 3.11 this gives 10 documents, ~49K characters
# (~10% of the text): enough for a stable perplexity, while keeping train large.
TEST_EVERY = 8

TEST_OFFSET = 2

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


def _is_test_document(index: int) -> bool:
    return index % TEST_EVERY == TEST_OFFSET


def pydoc_corpus_text(split: str) -> str:
    """The train or test text of the pydoc corpus: whole documents joined by blank lines.

    Splitting by document (not by character offset) keeps the held-out text genuinely
    unseen: no topic contributes to both sides.
    """
    if split not in CORPUS_SPLITS:
        raise DataError(f"unknown corpus split {split!r}; valid splits are {', '.join(CORPUS_SPLITS)}")
    want_test = split == "test"
    docs = [text for i, (_, text) in enumerate(_pydoc_documents()) if _is_test_document(i) == want_test]
    return DOC_SEPARATOR.join(docs)


def _corpus_fingerprint() -> str:
    """A hash of the corpus, recorded so a cache built on another Python is recognisable."""
    digest = hashlib.sha256()
    for key, text in _pydoc_documents():
        digest.update(key.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()
