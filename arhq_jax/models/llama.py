"""Llama family (Llama-2, Llama-3.x, SmolLM2; ``LlamaForCausalLM``): config.json ↔ ``ModelConfig``.

The decoder itself is ``arhq_jax.models.transformer``; Llama has no q_norm/k_norm and may carry
``attention_bias`` (q/k/v/o) and ``mlp_bias`` (gate/up/down).
"""

from __future__ import annotations

from typing import Any

from arhq_jax.models.config import ModelConfig
from arhq_jax.models.hf_config import common_to_hf, parse_common

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
DEFAULT_MAX_POSITIONS = 2048  # LlamaConfig's class default


def config_from_hf(d: dict, *, param_dtype: Any = "float32", dtype: Any = "float32") -> ModelConfig:
    """A ``ModelConfig`` from a Llama config.json dict (4.x or 5.x rope form)."""
    if d.get("sliding_window") is not None or d.get("use_sliding_window"):
        raise ValueError(
            "sliding-window attention is not supported; supported: full causal attention"
        )
    return parse_common(
        d,
        family="llama",
        param_dtype=param_dtype,
        dtype=dtype,
        default_max_positions=DEFAULT_MAX_POSITIONS,
        mlp_bias=bool(d.get("mlp_bias", False)),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers 5.x loads as a ``LlamaConfig``."""
    d = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    d.update(common_to_hf(cfg))
    d["mlp_bias"] = cfg.mlp_bias
    d["pretraining_tp"] = 1
    return d
