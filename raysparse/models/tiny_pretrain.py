"""How the `tiny` preset is made: its BPE tokenizer, its Llama config and a short seeded pretraining.

Deterministic for a given config and corpus, so every machine builds the same preset.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raysparse.data.pydoc import DOC_SEPARATOR
from raysparse.errors import DataError, ModelError

logger = logging.getLogger(__name__)

TINY_PRESET_NAME = "tiny"

BOS_TOKEN = "<s>"

EOS_TOKEN = "</s>"

PAD_TOKEN = "<pad>"

UNK_TOKEN = "<unk>"

SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


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


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """A byte-level BPE fitted to ``text``, wrapped as a ``PreTrainedTokenizerFast``.

    Byte-level means no input is ever out of vocabulary. No post-processor is set, so
    encoding adds no BOS/EOS: perplexity streams are just the text's tokens.
    ``model_max_length`` is left unbounded on purpose: whole corpora are encoded as one
    stream and cut into windows afterwards, which a bound would flood with warnings.
    """

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


def _build_model(config: TinyPretrainConfig, tokenizer: Any) -> torch.nn.Module:
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
