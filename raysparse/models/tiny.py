"""The "tiny" preset: a small Llama-style model pretrained offline on first use.

raysparse must run end to end (tests, CI, a laptop demo) without a model hub or a
dataset download. So the default model is built locally from text every Python install
ships (the standard library's ``pydoc_data`` help topics): a byte-level BPE tokenizer
and a ~0.9M-parameter ``LlamaForCausalLM`` with grouped-query attention, pretrained for
about two minutes on CPU. It is good enough that pruning visibly hurts it and a short
fine-tune visibly recovers it, which is all a pruning testbed needs.

The result is cached under ``cache_dir() / "tiny-v1"`` and built at most once even when
many processes (Ray trials) ask for it at the same time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from raysparse.data.pydoc import _corpus_fingerprint, pydoc_corpus_text
from raysparse.models.adapters import count_params
from raysparse.models.tiny_pretrain import (
    TINY_PRESET_NAME,
    TinyPretrainConfig,
    _build_model,
    _encode_stream,
    _pretrain,
    stream_perplexity,
    train_tokenizer,
)
from raysparse.paths import cache_dir, exclusive_lock, write_json_atomic

logger = logging.getLogger(__name__)

TINY_DIRNAME = "tiny-v2"  # v2: validation split held out of pretraining, deduplicated held-out text

TINY_INFO_FILE = "tiny_info.json"

# Bump when the recipe changes in a way that makes old cached folders wrong.
TINY_FORMAT_VERSION = 2

# Files that must exist for a cached folder to count as complete (info is written last).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_tiny_model(out_dir: Path, config: TinyPretrainConfig | None = None) -> dict[str, Any]:
    """Train the tokenizer and model from scratch and save them into ``out_dir``.

    Writes tiny_info.json last, so its presence marks the folder complete. Seeds the
    global torch RNG only inside ``fork_rng``, leaving the caller's RNG state untouched.
    Returns the info dict.
    """

    config = config or TinyPretrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    logger.info("tiny preset: training a %d-token byte-level BPE on the pydoc corpus", config.vocab_size)
    train_text = pydoc_corpus_text("train")
    tokenizer = train_tokenizer(train_text, config.vocab_size)
    train_stream = _encode_stream(tokenizer, train_text)
    test_stream = _encode_stream(tokenizer, pydoc_corpus_text("test"))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = _build_model(config, tokenizer)
        n_params = count_params(model)
        logger.info(
            "tiny preset: pretraining %d parameters for %d steps on %d train tokens",
            n_params, config.steps, train_stream.numel(),
        )
        losses = _pretrain(model, train_stream, config)
    heldout_ppl = stream_perplexity(model, test_stream, config.eval_window)
    wall_time = time.perf_counter() - started
    logger.info("tiny preset: held-out perplexity %.2f after %.1fs", heldout_ppl, wall_time)

    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    info = {
        "preset": TINY_PRESET_NAME,
        "format_version": TINY_FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "steps": config.steps,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "train_tokens": int(train_stream.numel()),
        "test_tokens": int(test_stream.numel()),
        "final_train_loss": losses[-1],
        "final_train_loss_avg10": sum(losses[-10:]) / len(losses[-10:]),
        "heldout_ppl": heldout_ppl,
        "heldout_window": config.eval_window,
        "wall_time_s": wall_time,
        "torch_num_threads": torch.get_num_threads(),
        "corpus_sha256": _corpus_fingerprint(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created_unix": time.time(),
    }
    write_json_atomic(out_dir / TINY_INFO_FILE, info, sort_keys=True)
    return info


def read_tiny_info(folder: Path) -> dict[str, Any] | None:
    """The folder's tiny_info.json, or None when missing, unreadable, or from another format."""
    try:
        info = json.loads((Path(folder) / TINY_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format_version") != TINY_FORMAT_VERSION:
        return None
    return info


def _is_complete(folder: Path) -> bool:
    return read_tiny_info(folder) is not None and all((folder / name).is_file() for name in _REQUIRED_FILES)


def _remove_stale_builds(root: Path) -> None:
    """Delete scratch folders left by builds that crashed; safe only while holding the lock."""
    for prefix in (f".{TINY_DIRNAME}.building-", f".{TINY_DIRNAME}.old-"):
        for stale in root.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)


def _install(built: Path, target: Path) -> None:
    """Move a finished build into place; an old folder is first renamed aside, then removed."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{TINY_DIRNAME}.old-"))
        os.replace(target, old / "previous")
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tiny_model_is_built(cache_root: Path | None = None) -> bool:
    """Is the preset in the cache already (so using it costs no build)?"""
    root = Path(cache_root) if cache_root is not None else cache_dir()
    return _is_complete(root / TINY_DIRNAME)


def ensure_tiny_model(cache_root: Path | None = None, force: bool = False) -> Path:
    """Return the folder of the tiny preset, building it once if needed.

    The folder is loadable with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``. Concurrent callers serialise on a file lock; the
    build happens in a scratch sibling folder that is renamed into place only when
    complete, so no caller ever sees a half-written model. ``force`` rebuilds even if a
    complete folder exists (callers holding the old path should reload afterwards).
    """
    root = Path(cache_root) if cache_root is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / TINY_DIRNAME
    if not force and _is_complete(target):
        return target

    with exclusive_lock(root / f"{TINY_DIRNAME}.lock", "tiny preset"):
        if not force and _is_complete(target):  # built by another process while we waited
            return target
        _remove_stale_builds(root)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".{TINY_DIRNAME}.building-"))
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            logger.info("tiny preset: building into %s (about two minutes on CPU)", target)
            build_tiny_model(scratch)
            _install(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target
