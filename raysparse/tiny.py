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

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raysparse.errors import DataError, ModelError
from raysparse.models import count_params
from raysparse.paths import cache_dir, write_json_atomic

logger = logging.getLogger(__name__)

TINY_PRESET_NAME = "tiny"
TINY_DIRNAME = "tiny-v1"
TINY_INFO_FILE = "tiny_info.json"
# Bump when the recipe changes in a way that makes old cached folders wrong.
TINY_FORMAT_VERSION = 1

CORPUS_SPLITS = ("train", "test")
# Every TEST_EVERY-th document (in sorted-key order), starting at TEST_OFFSET, is held
# out. With the 79 topics of CPython 3.11 this gives 10 documents, ~49K characters
# (~10% of the text): enough for a stable perplexity, while keeping train large.
TEST_EVERY = 8
TEST_OFFSET = 2
DOC_SEPARATOR = "\n\n"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Files that must exist for a cached folder to count as complete (info is written last).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TinyPretrainConfig:
    """Everything that determines the tiny preset; recorded in tiny_info.json.

    Tuned on 2 CPU cores: 700 steps of 8 x 256 tokens (~10 passes over the ~143K-token
    train stream) take ~100 s. Peak lr 2e-3 gave the best held-out perplexity among
    1.5e-3/2e-3/3e-3/5e-3 (5e-3 is unstable); more steps mostly widen the train/test gap.
    """

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 256
    steps: int = 700
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_window: int = 256

    @property
    def head_dim(self) -> int:
        """Per-head width; hidden_size must split evenly across the query heads."""
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------- corpus


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


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """A byte-level BPE fitted to ``text``, wrapped as a ``PreTrainedTokenizerFast``.

    Byte-level means no input is ever out of vocabulary. No post-processor is set, so
    encoding adds no BOS/EOS: perplexity streams are just the text's tokens.
    ``model_max_length`` is left unbounded on purpose: whole corpora are encoded as one
    stream and cut into windows afterwards, which a bound would flood with warnings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One document per item; the BPE trainer counts words, so order does not matter,
    # and its merge ties are broken deterministically.
    backend.train_from_iterator(text.split(DOC_SEPARATOR), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
    )


def _encode_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one long 1-D tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model


def _build_model(config: TinyPretrainConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise ModelError(
            f"tiny preset: hidden_size {config.hidden_size}, num_heads {config.num_heads} and "
            f"num_kv_heads {config.num_kv_heads} must divide evenly"
        )
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama_config)


def _lr_factor(step: int, config: TinyPretrainConfig) -> float:
    """Linear warmup, then cosine decay down to ``min_lr_ratio`` of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def _make_optimizer(model: torch.nn.Module, config: TinyPretrainConfig) -> torch.optim.Optimizer:
    """AdamW that decays matrices only: decaying norms and biases just hurts a small model."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def _sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of the token stream; a private generator keeps batches reproducible."""
    if stream.numel() <= seq_len:
        raise DataError(f"training stream has {stream.numel()} tokens, fewer than seq_len {seq_len}")
    starts = torch.randint(0, stream.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def _pretrain(model: torch.nn.Module, stream: torch.Tensor, config: TinyPretrainConfig) -> list[float]:
    """Train in place; returns the per-step training losses."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    model.train()
    losses: list[float] = []
    progress = tqdm(range(config.steps), desc=f"pretraining {TINY_PRESET_NAME} preset", unit="step")
    for step in progress:
        batch = _sample_batch(stream, config.batch_size, config.seq_len, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == config.steps - 1:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("tiny preset step %d/%d: train loss %.4f", step + 1, config.steps, losses[-1])
    progress.close()
    model.eval()
    return losses


@torch.no_grad()
def stream_perplexity(model: torch.nn.Module, stream: torch.Tensor, window: int = 256) -> float:
    """Perplexity over non-overlapping windows of a token stream, weighted per token.

    Each window is scored independently (no carried context), the usual cheap protocol;
    a trailing window shorter than two tokens has nothing to predict and is skipped.
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, stream.numel(), window):
        chunk = stream[start : start + window].unsqueeze(0)
        predicted = chunk.shape[1] - 1
        if predicted < 1:
            continue
        loss = model(input_ids=chunk, labels=chunk).loss
        total_nll += loss.item() * predicted
        total_tokens += predicted
    model.train(was_training)
    if total_tokens == 0:
        raise DataError("perplexity stream is empty")
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------- build + cache


def build_tiny_model(out_dir: Path, config: TinyPretrainConfig | None = None) -> dict[str, Any]:
    """Train the tokenizer and model from scratch and save them into ``out_dir``.

    Writes tiny_info.json last, so its presence marks the folder complete. Seeds the
    global torch RNG only inside ``fork_rng``, leaving the caller's RNG state untouched.
    Returns the info dict.
    """
    import transformers

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


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Block until this process holds the build lock; released on exit or process death."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("tiny preset: another process is building it; waiting for %s", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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

    with _exclusive_lock(root / f"{TINY_DIRNAME}.lock"):
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
