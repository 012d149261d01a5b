"""What a model *is*, independent of where it lies: the key of everything cached about it.

Cached statistics and pruning results keyed by a model's path string would be served for
another model saved at the same path later (a fine-tuned copy, a re-downloaded checkpoint),
and lost when the folder moves. A local model is identified by the digests of its config
and weight files instead; hashing gigabytes of weights is done once per file and remembered
by path, size and modification time (under the raysparse cache folder), so a trial pays
only a stat() per file afterwards. A hub model is identified by its id and the commit it
resolved to. A GGUF model is one file holding config, tokenizer and weights: its digest.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from raysparse.paths import cache_dir, write_json_atomic

logger = logging.getLogger(__name__)

# The files that determine a model's outputs: config and weights (the tokenizer is keyed apart).
MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")

CHUNK = 1 << 22


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path, memo_dir: Path | None = None) -> dict[str, str]:
    """sha256 of each model file of `folder` (or of the one file `folder` names), by name;
    unchanged files (size, mtime) are not re-read."""
    folder = folder.resolve()
    memo_file = (memo_dir or cache_dir() / "fingerprints") / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:24]}.json"
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if folder.is_file():  # a single-file model (GGUF)
        files = [folder]
    else:
        files = sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    digests: dict[str, str] = {}
    fresh: dict[str, dict[str, object]] = {}
    for path in files:
        stat = path.stat()
        known = memo.get(path.name)
        if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns \
                and isinstance(known.get("sha256"), str):
            digest = known["sha256"]
        else:
            logger.info("fingerprinting %s (%.1f MB)", path, stat.st_size / 1e6)
            digest = _file_digest(path)
        digests[path.name] = digest
        fresh[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    if fresh != memo:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo_file, fresh, sort_keys=True)
    return digests


def model_fingerprint(name_or_path: str, revision: str | None = None, memo_dir: Path | None = None) -> str:
    """A digest of the model's config and weights (local folder or GGUF file), or of hub id + revision."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() or folder.is_file():
        payload = {"files": file_digests(folder, memo_dir)}
    else:
        payload = {"hub": name_or_path, "revision": revision or "unresolved"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
