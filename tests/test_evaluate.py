"""Perplexity against an independent token-by-token computation."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from raysparse.metrics.perplexity import perplexity


def independent_nll(model, stream, seqlen, stride):
    """Score every token once with as much left context as the window allows, one window at a time."""
    nlls, scored_until = [], 0
    for start in range(0, stream.numel() - seqlen + 1, stride):
        window = stream[start:start + seqlen]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
        for pos in range(1, seqlen):
            absolute = start + pos
            if absolute >= max(scored_until, 1):
                nlls.append(-float(logp[pos - 1, window[pos]]))
        scored_until = start + seqlen
    return nlls


@pytest.mark.parametrize("seqlen,stride", [(16, 16), (16, 8), (20, 5)])
def test_perplexity_is_exp_of_mean_token_nll(seqlen, stride):
    model = build_model("llama", vocab_size=64)
    stream = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(3))
    nlls = independent_nll(model, stream, seqlen, stride)
    result = perplexity(model, stream, seqlen, stride, batch_size=3, progress=False)
    assert result.tokens_scored == len(nlls)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_non_overlapping_windows_drop_the_partial_tail_and_restore_mode():
    model = build_model("gpt2", vocab_size=64).train()
    stream = torch.randint(0, 64, (70,))
    result = perplexity(model, stream, 16, progress=False)
    assert result.windows == 4 and result.tokens_scored == 4 * 15
    assert model.training  # the caller's mode is restored


def test_max_windows_limits_the_evaluation():
    model = build_model("opt", vocab_size=64)
    stream = torch.randint(0, 64, (200,))
    assert perplexity(model, stream, 16, max_windows=2, progress=False).windows == 2
