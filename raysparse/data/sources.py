"""Calibration, validation and test token streams, from hub datasets or local files.

Every dataset can come from a local file, because hub layouts drift and clusters are often
offline: a path is always accepted where a dataset name is. Named datasets follow the
papers' splits: calibration and training text from the train split, test text (reported,
never used for a decision) from the test split, and validation text (every decision: the
kept epoch, early stopping, the search) from the validation split, so selecting on it does
not bias the reported number. For C4 both come from the validation shard, from disjoint
documents (test: the papers' first 1100, validation: the next 1100). Text is
tokenized once per (tokenizer, text) and cached as a tensor, since tokenizing WikiText-2 or
C4 is slower than evaluating a small model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from raysparse.data.hub import apply_offline_switches
from raysparse.data.pydoc import pydoc_corpus_text
from raysparse.data.text import NAMED_DATASETS, Role, TextSource, read_local, resolve_source
from raysparse.errors import DataError
from raysparse.paths import cache_dir

__all__ = ["NAMED_DATASETS", "Role", "TextSource", "calibration_windows", "load_text", "resolve_source",
           "token_stream", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)

# How many C4 validation documents the SparseGPT/Wanda evaluation uses (our test text);
# the next as many are the validation text.
_C4_EVAL_DOCS = 1100


def load_text(source: TextSource) -> str:
    """The raw text of a source, documents joined with blank lines as the reference code does."""
    if source.is_file:
        return read_local(Path(source.name))
    if source.name == "pydoc":
        return pydoc_corpus_text(source.split)
    return _load_hub_text(source)


def _load_hub_text(source: TextSource) -> str:
    """Hub datasets with the papers' splits; a clear message when the hub is unreachable."""
    apply_offline_switches()
    try:
        from datasets import load_dataset

        if source.name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=source.split)
            return "\n\n".join(rows["text"])
        if source.name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split=source.split)
            return ("\n\n" if source.split == "train" else " ").join(rows["sentence"])
        if source.split == "train":
            rows = load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
            return "\n\n".join(rows["text"])
        rows = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )
        if source.split == "validation-heldout":
            return " ".join(rows[_C4_EVAL_DOCS:2 * _C4_EVAL_DOCS]["text"])
        return " ".join(rows[:_C4_EVAL_DOCS]["text"])
    except Exception as exc:  # noqa: BLE001 - every hub failure gets the same fix
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot load dataset '{source.name}' ({source.split}) from the hub: {first_line}. "
            "Download it once and pass a local file instead (--calib-data/--val-data/--eval-data PATH)"
        ) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable id for a tokenizer, so cached token streams are never reused across vocabularies."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizers: vocabulary and class are a good enough identity
        payload = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def token_stream(tokenizer, source: TextSource, use_cache: bool = True) -> torch.Tensor:
    """The whole source tokenized as one 1-D LongTensor (cached on disk)."""
    text = load_text(source)
    key = hashlib.sha256(
        (tokenizer_fingerprint(tokenizer) + "\0" + hashlib.sha256(text.encode()).hexdigest()).encode()
    ).hexdigest()[:24]
    cache_file = cache_dir() / "tokens" / f"{key}.pt"
    if use_cache and cache_file.is_file():
        try:
            return torch.load(cache_file)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            logger.warning("ignoring unreadable token cache %s", cache_file)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].to(torch.long)
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{torch.randint(1 << 30, ()).item()}.tmp")
        torch.save(ids, tmp)
        tmp.replace(cache_file)
    logger.info("tokenized %s: %s tokens", source.describe(), f"{ids.numel():,}")
    return ids


def calibration_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, role: str = "calibration",
                        flag: str = "--seqlen") -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, the same for the same seed.

    Windows are drawn from the token stream of the whole calibration text (documents joined
    with blank lines), which keeps short documents usable and the draw reproducible.
    """
    if stream.numel() <= seqlen:
        raise DataError(
            f"the {role} text has {stream.numel()} tokens, fewer than one window of {seqlen}: "
            f"use a larger file or a smaller {flag}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
