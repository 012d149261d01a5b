"""Perplexity by the reference protocol (SparseGPT/Wanda): fixed windows over one token stream.

With stride == window (the default) windows do not overlap and every window scores its
window-1 next-token predictions, so the result equals exp(mean over windows of the mean
NLL) as in the papers. With a smaller stride, each window scores only the tokens that no
earlier window scored, using the overlap as context (Hugging Face's sliding-window recipe).
A trailing partial window is dropped, as in the reference code.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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


def window_starts(total_tokens: int, seqlen: int, stride: int, max_windows: int | None = None) -> list[int]:
    starts = list(range(0, total_tokens - seqlen + 1, stride))
    return starts[:max_windows] if max_windows else starts


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
) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token stream; restores the model's train/eval mode."""
    stride = stride or seqlen
    if stride > seqlen:
        raise ValueError(f"stride {stride} > window {seqlen} would skip tokens")
    starts = window_starts(stream.numel(), seqlen, stride, max_windows)
    if not starts:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            inputs = torch.stack([stream[s : s + seqlen] for s in batch]).to(device)
            labels = inputs.clone()
            for row, start in enumerate(batch):
                already_scored = 0 if start == 0 else seqlen - stride
                labels[row, :already_scored] = -100  # overlap serves only as context
            logits = model(input_ids=inputs, use_cache=False).logits
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:]
            nll = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    ppl = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return PerplexityResult(ppl, mean_nll, total_tokens, len(starts), seqlen, stride)
