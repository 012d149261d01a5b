"""LAMBADA-style last-word prediction over text raysparse already has offline.

Each document is one paragraph of held-out text (at most MAX_WORDS words, ending in a
word of letters); the model sees all but the last word and is right when its greedy
continuation is exactly that word (lm-eval's `acc` of a loglikelihood task). Documents
come from held-out text only, validation and test from disjoint parts:

- pydoc (the `tiny` preset): the corpus' validation and test splits (raysparse.data.pydoc),
  which the preset never trained on and which the default calibration text (pydoc train)
  does not contain.
- TinyStories (stories260K): the third quarter of ../shared/data/tinystories_valid's text
  is validation, the fourth is test; calibrate and train on the first half (the split the
  benchmarks use).

The documents are written as JSON lines into raysparse's cache folder and loaded with the
`json` builder of `datasets`, so nothing is fetched from the hub.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

MAX_WORDS = 48  # context kept before the last word (short models: 128-256 token windows)

MIN_WORDS = 12

MAX_DOCS = 400  # per split

_WORD = re.compile(r"[A-Za-z]+")

TINYSTORIES_ENV = "RAYSPARSE_TINYSTORIES"


def lastword_documents(text: str, max_docs: int = MAX_DOCS) -> list[str]:
    """Non-overlapping passages of `text` (at most MAX_WORDS words) that end in a predictable word.

    As in LAMBADA, the last word must be predictable from the passage: a passage ends at a
    plain word (letters only, three or more) that already occurs in the MAX_WORDS - 1 words
    before it, so a model that reads its context can get it right and one that lost that
    ability (pruned too far) cannot. Each passage starts after the previous one's last word.
    """
    words = text.split()
    docs: list[str] = []
    start = 0
    for i in range(len(words)):
        if i - start + 1 < MIN_WORDS:
            continue
        target = words[i].rstrip(".,;:!?\"')")
        if len(target) < 3 or not _WORD.fullmatch(target):
            continue
        context = words[max(start, i - MAX_WORDS + 1): i]
        if target.lower() not in {w.strip(".,;:!?\"'()").lower() for w in context}:
            continue
        docs.append(" ".join(context + [target]))
        start = i + 1
        if len(docs) >= max_docs:
            break
    return docs


def tinystories_text() -> Path:
    """The TinyStories text: $RAYSPARSE_TINYSTORIES, else the development checkout's shared data."""
    explicit = os.environ.get(TINYSTORIES_ENV)
    path = Path(explicit) if explicit else (Path(__file__).resolve().parents[3] / "shared" / "data"
                                            / "tinystories_valid" / "tinystories_val.txt")
    if not path.is_file():
        raise FileNotFoundError(f"the TinyStories text {path} is absent: set {TINYSTORIES_ENV} to a copy of "
                                "tinystories_val.txt (TinyStories validation stories separated by blank lines)")
    return path


def tinystories_splits(text: str) -> dict[str, str]:
    """Validation: the third quarter of the text; test: the fourth (the first half is for calibration)."""
    quarter = len(text) // 4
    # Drop the first paragraph of each part: the cut may fall inside it.
    cut = lambda piece: piece.split("\n\n", 1)[-1]  # noqa: E731
    return {"validation": cut(text[2 * quarter: 3 * quarter]), "test": cut(text[3 * quarter:])}


def _as_dataset(name: str, splits: dict[str, list[str]]):
    import datasets

    from raysparse.paths import cache_dir

    folder = cache_dir() / "tasks" / name
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, docs in splits.items():
        path = folder / f"{split}.jsonl"
        payload = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
        if not path.is_file() or path.read_text(encoding="utf-8") != payload:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(payload, encoding="utf-8")
            tmp.replace(path)
        files[split] = str(path)
    return datasets.load_dataset("json", data_files=files)


def pydoc_dataset(**_: object):
    """The `tiny` preset's task: last words of the pydoc corpus' held-out paragraphs."""
    from raysparse.data.pydoc import pydoc_corpus_text

    return _as_dataset("lastword_pydoc", {split: lastword_documents(pydoc_corpus_text(split))
                                          for split in ("validation", "test")})


def tinystories_dataset(**_: object):
    """stories260K's task: last words of held-out TinyStories paragraphs."""
    text = tinystories_text().read_text(encoding="utf-8")
    return _as_dataset("lastword_tinystories", {split: lastword_documents(part)
                                                for split, part in tinystories_splits(text).items()})
