"""Tiny local model files for CLI tests: a byte-level BPE tokenizer trained on the pydoc corpus
(300 tokens, built in well under a second), a tiny Llama HF directory that carries it, a tiny
Qwen3 GGUF (F32 tensors, no tokenizer metadata), and the tiny Llama with SmolLM2's vocabulary
and tokenizer (``write_smollm2_tiny_dir``; conftest's ``tiny_dir`` fixture)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from arhq_jax.models.config import ModelConfig
from arhq_jax.models.params import params_to_tensors, random_params

VOCAB = 300
MAX_POSITIONS = 256


@functools.cache
def tokenizer():
    """A transformers fast tokenizer: byte-level BPE with ``VOCAB`` tokens, eos <|endoftext|>."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n\n".join(topics[k] for k in sorted(topics))[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def config(family: str = "llama") -> ModelConfig:
    return smollm2_tiny_config(
        VOCAB, family=family, max_position_embeddings=MAX_POSITIONS, eos_token_id=0
    )


def params(cfg: ModelConfig, seed: int = 3):
    return random_params(cfg, jax.random.key(seed), std=0.1)


def smollm2_tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    """The tiny Llama of the CLI tests sized for SmolLM2's vocabulary (so its tokenizer fits)."""
    base = dict(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        tie_word_embeddings=True,
    )
    return ModelConfig(**(base | overrides))


def write_smollm2_tiny_dir(path: Path, smollm2, **overrides) -> Path:
    """``smollm2_tiny_config`` (random weights, seed 3) with SmolLM2's tokenizer as a HF directory
    (``smollm2``: the ``converters.LoadedModel`` of conftest's session fixture)."""
    from converters import save_hf_dir

    cfg = smollm2_tiny_config(smollm2.cfg.vocab_size, **overrides)
    save_hf_dir(cfg, params(cfg), path, tokenizer=smollm2.tokenizer)
    return path


def write_hf_dir(path: Path, *, with_tokenizer: bool = True) -> Path:
    """The tiny Llama as a HF directory (``converters.save_hf_dir``)."""
    from converters import save_hf_dir

    cfg = config()
    tok = tokenizer() if with_tokenizer else None
    return save_hf_dir(cfg, params(cfg), path, tokenizer=tok)


_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def _gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[stem]}.{kind}"
    _, _, i, part = stem.split(".", 3)  # model.layers.<i>.<part>
    return f"blk.{i}.{_GGUF_BLOCK[part]}.{kind}"


def write_gguf(path: Path) -> Path:
    """The tiny model as a Qwen3 GGUF (stored unpermuted) with F32 tensors, no tokenizer."""
    import gguf

    cfg = config("qwen3")
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    for name, arr in params_to_tensors(cfg, params(cfg)):
        if name == "lm_head.weight":
            continue  # tied
        w.add_tensor(_gguf_name(name), np.asarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
