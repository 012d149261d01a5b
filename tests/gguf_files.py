"""Write small GGUF files for tests: a Llama model with its BPE tokenizer, or a bare header.

The tensors and metadata are laid out the way llama.cpp's `convert_hf_to_gguf.py` writes a
Llama checkpoint (q/k rows permuted for its rotary layout, `blk.N.*` names, a `gpt2` BPE
tokenizer), in float32, so transformers' GGUF reader gives back exactly the model written:
the GGUF input path is tested in seconds without downloading a real GGUF model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Hugging Face Llama name (after `model.layers.N.`) -> GGUF name (after `blk.N.`)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); the reader undoes it."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_tokenizer(writer, tokenizer) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)


def write_llama_gguf(path: Path, model, tokenizer) -> Path:
    """`model` (a LlamaForCausalLM) and its byte-level BPE `tokenizer` as one float32 GGUF file."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("raysparse-test-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{i}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                weight = _permute(weight, c.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                weight = _permute(weight, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}", weight)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_header_gguf(path: Path, arch: str) -> Path:
    """A well-formed GGUF file of architecture `arch` holding one small tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
