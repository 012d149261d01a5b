"""Perplexity by the reference protocol (SparseGPT/Wanda): fixed windows over one token stream.

With stride == window (the default) windows do not overlap and every window scores its
window-1 next-token predictions, so the result equals exp(mean over windows of the mean
NLL) as in the papers. With a smaller stride, each window scores only the tokens that no
earlier window scored, using the overlap as context (Hugging Face's sliding-window recipe).
A trailing partial window is dropped, as in the reference code.

The loss is computed from the final hidden states through the LM head in chunks of scored
tokens, each chunk's logits upcast to float32 on their own: at a 49K-150K vocabulary the
full-batch float32 logits, not the layers, are the largest tensor of an evaluation batch
(4 windows x 2048 tokens x 128K x 4 bytes = 4 GiB), and the tokens an overlapping window
only uses as context never reach the head at all. Models whose logits are not simply
`head(last hidden state)` (logit soft-capping or scaling, PEFT or FSDP wrappers) take the
plain path: the model's own logits, upcast whole.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# Float32 logits held at once by the chunked loss (per chunk of scored tokens). Chunks of
# fewer than ~500 rows made the LM-head matmul measurably slower at a 49K vocabulary (CPU).
LOSS_CHUNK_BYTES = 128 * 2**20

# Families whose causal-LM forward is exactly `lm_head(base_model(...).last_hidden_state)`.
PLAIN_HEAD_FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox", "phi", "phi3", "gemma", "falcon",
    "bloom", "mixtral", "qwen2_moe", "qwen3_moe", "stablelm", "olmo", "olmo2", "starcoder2", "gptj",
})


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens_scored: int
    windows: int
    seqlen: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def _scored_in_window(index: int, seqlen: int, stride: int) -> int:
    """Next-token predictions window `index` scores: all of the first, the new tokens of the others."""
    return seqlen - 1 if index == 0 else min(stride, seqlen - 1)


def window_starts(total_tokens: int, seqlen: int, stride: int, max_windows: int | None = None,
                  max_tokens: int | None = None) -> list[int]:
    """Window starts; `max_windows` keeps the first N windows, `max_tokens` the windows that
    score the first N tokens (the last one scores only what is left of N)."""
    starts = list(range(0, total_tokens - seqlen + 1, stride))
    if max_windows:
        starts = starts[:max_windows]
    if max_tokens:
        scored = 0
        for index in range(len(starts)):
            scored += _scored_in_window(index, seqlen, stride)
            if scored >= max_tokens:
                return starts[: index + 1]
    return starts


def split_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, head) when the model's logits are exactly head(backbone(...).last_hidden_state)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or _is_fsdp(model):
        return None  # PEFT / FSDP wrappers run their own hooks around the whole forward
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    head = model.get_output_embeddings()
    backbone = getattr(model, model.base_model_prefix, None)
    if not isinstance(head, nn.Linear) or not isinstance(backbone, nn.Module) or backbone is model:
        return None
    return backbone, head


def _is_fsdp(model: nn.Module) -> bool:
    """A fully_shard-ed model: its root unshards the head and embeddings only in its own forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return type(model).__name__.startswith("FSDP")
    return isinstance(model, FSDPModule) or type(model).__name__.startswith("FSDP")


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                chunk_bytes: int = LOSS_CHUNK_BYTES) -> float:
    """Summed next-token NLL of `targets` (n,) from final hidden states (n, d), a chunk of rows
    through the head at a time, each chunk's logits upcast to float32 alone."""
    vocab = head.out_features if isinstance(head, nn.Linear) else head(hidden[:1]).shape[-1]
    rows = max(1, chunk_bytes // (4 * vocab))
    total = 0.0
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start : start + rows]).float()
        total += float(F.cross_entropy(logits, targets[start : start + rows], reduction="sum"))
    return total


@torch.no_grad()
def perplexity(
    model: nn.Module,
    stream: torch.Tensor,
    seqlen: int,
    stride: int | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
    progress: bool = True,
    max_tokens: int | None = None,
    chunked: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token stream; restores the model's train/eval mode.

    `max_tokens` scores exactly the first N tokens the windows would score (all there are if
    fewer); `chunked=False` forces the plain path (the model's own full logits).
    """
    stride = stride or seqlen
    if stride > seqlen:
        raise ValueError(f"stride {stride} > window {seqlen} would skip tokens")
    starts = window_starts(stream.numel(), seqlen, stride, max_windows, max_tokens)
    if not starts:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    split = split_lm_head(model) if chunked else None
    was_training = model.training
    model.eval()
    total_nll, total_tokens, budget = 0.0, 0, max_tokens or math.inf
    try:
        for first in tqdm(range(0, len(starts), batch_size), desc=desc, disable=not progress, leave=False):
            batch = starts[first : first + batch_size]
            inputs = torch.stack([stream[s : s + seqlen] for s in batch]).to(device)
            scored = torch.zeros(inputs.shape[0], seqlen - 1, dtype=torch.bool, device=device)
            for row in range(len(batch)):
                new = _scored_in_window(first + row, seqlen, stride)  # the overlap before them is context
                count = int(min(new, budget))
                scored[row, seqlen - 1 - new : seqlen - 1 - new + count] = True
                budget -= count
            targets = inputs[:, 1:][scored]
            if split is not None:
                backbone, head = split
                hidden = backbone(input_ids=inputs, use_cache=False).last_hidden_state
                total_nll += chunked_nll(hidden[:, :-1][scored], targets, head)
            else:
                logits = model(input_ids=inputs, use_cache=False).logits
                total_nll += float(F.cross_entropy(logits[:, :-1][scored].float(), targets, reduction="sum"))
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    ppl = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return PerplexityResult(ppl, mean_nll, total_tokens, len(starts), seqlen, stride)
