"""Tiny random transformers models (offline, torch CPU, eager, f32) and their JAX twins.

Shared by tests/models/test_models.py and tests/models/test_generate.py.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from arhq_jax.models import config_from_hf
from arhq_jax.models.params import params_from_tensors

# L0 = 64 and θ = 5e5 with d = 16: wavelengths 6.3 (< L0/hf = 16, kept), 32.5 (smoothed) and
# ≥ 167 (> L0/lf = 64, divided by the factor): all three llama3 regimes occur.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _hf_configs() -> dict:
    return {
        # The Qwen3 config of docs/spec/models.md §3 (intermediate_size is Qwen3Config's default).
        "qwen3": Qwen3Config(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
        ),
        "llama3": LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING},
            tie_word_embeddings=False,
        ),
        "llama_bias": LlamaConfig(
            vocab_size=256,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            rms_norm_eps=1e-5,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
    }


NAMES = ("qwen3", "llama3", "llama_bias")


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    # HF's init (std 0.02, unit norms, zero biases) gives near-uniform attention and hides a
    # missing norm or bias; O(1) activations and sharp attention make every detail visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * z)
            elif name.endswith(".bias"):
                p.copy_(0.1 * z)
            elif "embed_tokens" in name:
                p.copy_(0.25 * z)
            else:
                p.copy_(z / p.shape[1] ** 0.5)


@functools.cache
def hf_model(name: str):
    """A tiny random HF model (eval mode, f32, eager attention)."""
    torch.manual_seed(1234 + NAMES.index(name))
    cfg = _hf_configs()[name]
    cls = Qwen3ForCausalLM if name == "qwen3" else LlamaForCausalLM
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _randomize(model, torch.Generator().manual_seed(99 + NAMES.index(name)))
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """torch on one thread, no grad: for these tiny models extra threads only add overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(n)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


@functools.cache
def jax_model(name: str, param_dtype: str = "float32", dtype: str = "float32"):
    """``(cfg, params)`` mapped from ``hf_model(name)`` with ``params_from_tensors``."""
    model = hf_model(name)
    cfg = config_from_hf(model.config.to_dict(), param_dtype=param_dtype, dtype=dtype)
    sd = state_dict_numpy(model)
    return cfg, params_from_tensors(cfg, sd.get)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """HF logits ``[B, T, V]`` f32; with a left-padding mask, positions count valid tokens."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    kw = {}
    if mask is not None:
        m = torch.as_tensor(mask, dtype=torch.long)
        kw = {"attention_mask": m, "position_ids": (m.cumsum(-1) - 1).clamp(min=0)}
    with one_thread():
        return model(ids_t, **kw).logits.float().numpy()
