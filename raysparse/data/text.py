"""Local and named text sources without torch: resolving a `--*-data` value, reading a local
file, and refusing what is not text, so the CLI can check every data file before it imports
torch or loads a model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raysparse.errors import DataError

Role = Literal["calibration", "validation", "test"]

NAMED_DATASETS = ("wikitext2", "c4", "ptb", "pydoc")

# How much of a file the up-front check reads, and the share of characters that may be
# unprintable (undecodable bytes, control characters) before a file counts as not text.
_SNIFF_BYTES = 1 << 16
_MAX_UNPRINTABLE = 0.05


@dataclass(frozen=True)
class TextSource:
    """A resolved data source: its name/path and which split a role maps to."""

    name: str
    split: str
    is_file: bool

    def describe(self) -> str:
        return f"{self.name} ({self.split})" if not self.is_file else f"file {self.name}"


def resolve_source(source: str, role: Role) -> TextSource:
    """Turn a user's `--calib-data` / `--val-data` / `--eval-data` value into a source, checking files exist."""
    if role not in ("calibration", "validation", "test"):
        raise ValueError(f"unknown data role {role!r}")
    if source in NAMED_DATASETS:
        split = {"calibration": "train", "validation": "validation", "test": "test"}[role]
        if source == "c4" and role == "test":
            split = "validation"  # the papers evaluate C4 on its validation shard
        if source == "c4" and role == "validation":
            split = "validation-heldout"
        return TextSource(source, split, is_file=False)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file not found: {source} (give an existing .txt/.jsonl file or one of "
            f"{', '.join(NAMED_DATASETS)})"
        )
    return TextSource(str(path.resolve()), "file", is_file=True)


def unprintable_share(text: str) -> float:
    """The fraction of characters that are undecodable bytes or control characters (not whitespace)."""
    if not text:
        return 0.0
    bad = sum(1 for ch in text if ch == "\ufffd" or (not ch.isprintable() and not ch.isspace()))
    return bad / len(text)


def check_is_text(path: Path, text: str) -> None:
    """Refuse binary data: random bytes tokenise fine and give a perplexity, just a meaningless one."""
    share = unprintable_share(text)
    if share > _MAX_UNPRINTABLE:
        raise DataError(f"data file {path} is not text ({100 * share:.0f}% of its characters are unprintable "
                        "or not UTF-8): give a UTF-8 .txt file or .jsonl with a 'text' field per line")


def sniff_text_file(source: str) -> None:
    """Cheap up-front check of a local data file: it exists, can be read and looks like text."""
    resolved = resolve_source(source, "calibration")
    if not resolved.is_file:
        return
    path = Path(resolved.name)
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read ({exc.strerror}): check its permissions") from None
    check_is_text(path, head.decode("utf-8", errors="replace"))


def read_local(path: Path) -> str:
    """A local .txt file, or the 'text' fields of a .jsonl file joined with blank lines."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    check_is_text(path, raw[:_SNIFF_BYTES])  # a sample: a whole corpus would take seconds to scan
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON lines ({exc.msg})") from None
            docs.append(_document_text(record, path, number))
        text = "\n\n".join(docs)
    else:
        text = raw.replace("\r\n", "\n")
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    return text


def _document_text(record: object, path: Path, number: int) -> str:
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        if isinstance(record.get("prefix"), str) and isinstance(record.get("gold_completion"), str):
            return record["prefix"] + record["gold_completion"]
        raise DataError(
            f"{path}:{number} has no 'text' field (keys: {', '.join(map(str, record))}); "
            "JSON lines need a 'text' string per line"
        )
    if isinstance(record, str):
        return record
    raise DataError(f"{path}:{number} is neither a string nor an object with a 'text' field")
