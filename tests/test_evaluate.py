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


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("seqlen,stride", [(16, 16), (20, 5)])
def test_chunked_loss_from_hidden_states_equals_the_full_logits(family, seqlen, stride, monkeypatch):
    model = build_model(family, vocab_size=64)
    stream = torch.randint(0, 64, (120,), generator=torch.Generator().manual_seed(5))
    plain = perplexity(model, stream, seqlen, stride, batch_size=3, progress=False, chunked=False)
    monkeypatch.setattr("raysparse.metrics.perplexity.LOSS_CHUNK_BYTES", 4 * 64 * 7)  # 7 tokens per chunk
    from raysparse.metrics import perplexity as module

    assert module.split_lm_head(model) is not None  # the chunked path is the one taken
    chunked = perplexity(model, stream, seqlen, stride, batch_size=3, progress=False)
    assert chunked.tokens_scored == plain.tokens_scored
    assert chunked.mean_nll == pytest.approx(plain.mean_nll, rel=1e-5, abs=1e-6)


def test_chunked_loss_on_the_tiny_preset_equals_the_plain_path(tiny_preset):
    from raysparse.models.loading import load_model

    loaded = load_model(str(tiny_preset), device="cpu", dtype="float32")
    stream = torch.tensor(loaded.tokenizer("def f(x):\n    return x + 1\n" * 40)["input_ids"])
    plain = perplexity(loaded.model, stream, 64, batch_size=4, progress=False, chunked=False)
    chunked = perplexity(loaded.model, stream, 64, batch_size=4, progress=False)
    assert chunked.ppl == pytest.approx(plain.ppl, rel=1e-5)


@pytest.mark.parametrize("seqlen,stride,max_tokens", [(16, 16, 40), (16, 16, 45), (20, 5, 33), (16, 16, 10_000)])
def test_max_tokens_scores_exactly_that_many_tokens(seqlen, stride, max_tokens):
    model = build_model("llama", vocab_size=64)
    stream = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1))
    every = perplexity(model, stream, seqlen, stride, progress=False)
    result = perplexity(model, stream, seqlen, stride, max_tokens=max_tokens, progress=False)
    assert result.tokens_scored == min(max_tokens, every.tokens_scored)
    nlls = independent_nll(model, stream, seqlen, stride)[:max_tokens]  # the same tokens, in order
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
