"""Latency per token of a causal LM, measured the same way before and after pruning.

Structured pruning is judged by the speed it buys, so the dense and the pruned model are
timed in the same process on the same inputs: prefill (one forward over a prompt, per
prompt token) and greedy decoding with the KV cache (per generated token). Medians over a
few repeats after a warm-up keep one slow run from deciding the number.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class Latency:
    prefill_ms_per_token: float
    decode_ms_per_token: float
    prompt_tokens: int
    new_tokens: int
    repeats: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model: nn.Module, context_length: int, device: torch.device, prompt_tokens: int = 64,
                    new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> Latency:
    """Median prefill and decode time per token (random token ids: timing does not depend on text)."""
    prompt_tokens = max(1, min(prompt_tokens, context_length // 2))
    new_tokens = max(1, min(new_tokens, context_length - prompt_tokens))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=generator).to(device)
    was_training = model.training
    model.eval()
    gen_args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=0, eos_token_id=None)
    try:
        model(input_ids=ids)  # warm-up (allocator, kernels)
        model.generate(ids, **gen_args)
        prefill, decode = [], []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(input_ids=ids)
            _sync(device)
            forward_s = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, **gen_args)
            _sync(device)
            generate_s = time.perf_counter() - start
            prefill.append(forward_s / prompt_tokens)
            decode.append(max(generate_s - forward_s, 0.0) / new_tokens)
    finally:
        model.train(was_training)
    return Latency(
        prefill_ms_per_token=1000 * statistics.median(prefill), decode_ms_per_token=1000 * statistics.median(decode),
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, device=str(device),
    )
