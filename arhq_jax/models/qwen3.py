"""Qwen3 family (dense ``Qwen3ForCausalLM``): config.json ↔ ``ModelConfig``.

Qwen3 differs from Llama only by the per-head RMSNorms ``q_norm``/``k_norm`` (weights ``[d]``),
applied after the q/k projections and before RoPE (``ModelConfig.qk_norm``), by an explicit
``head_dim`` that need not be hidden/heads, and by optional sliding-window layers, rejected here.
"""

from __future__ import annotations

from typing import Any

from arhq_jax.models.config import ModelConfig
from arhq_jax.models.hf_config import common_to_hf, parse_common

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
DEFAULT_MAX_POSITIONS = 32768  # Qwen3Config's class default


def config_from_hf(d: dict, *, param_dtype: Any = "float32", dtype: Any = "float32") -> ModelConfig:
    """A ``ModelConfig`` from a Qwen3 config.json dict (4.x or 5.x rope form)."""
    sliding = [t for t in d.get("layer_types") or () if t != "full_attention"]
    if d.get("use_sliding_window") or sliding:
        raise ValueError(
            "sliding-window attention (use_sliding_window / sliding layer_types) is not "
            "supported; supported layer types: full_attention"
        )
    if d.get("mlp_bias"):
        raise ValueError("Qwen3 has no MLP biases; supported: mlp_bias=false")
    return parse_common(
        d,
        family="qwen3",
        param_dtype=param_dtype,
        dtype=dtype,
        default_max_positions=DEFAULT_MAX_POSITIONS,
        mlp_bias=False,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers 5.x loads as a ``Qwen3Config``."""
    if cfg.mlp_bias:
        raise ValueError("Qwen3 has no MLP biases; cannot write mlp_bias=true")
    d = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    d.update(common_to_hf(cfg))
    d.update(
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=cfg.num_layers,
        layer_types=["full_attention"] * cfg.num_layers,
    )
    return d
