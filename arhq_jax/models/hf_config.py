"""Reading and writing Hugging Face ``config.json`` dicts (docs/spec/models.md §3), shared by
families.

Both the transformers 5.x form (``rope_parameters`` holding ``rope_type``, ``rope_theta`` and the
scaling keys) and the 4.x form (top-level ``rope_theta`` plus a ``rope_scaling`` dict whose type key
is ``rope_type`` or ``type``) are accepted; ``rope_parameters`` wins; a missing θ means 10000.
Architecture values are never defaulted where the spec forbids it (``rms_norm_eps``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from arhq_jax.models.config import SUPPORTED_ROPE_TYPES, ModelConfig

SUPPORTED_DTYPES = ("float32", "bfloat16")
SUPPORTED_ACTIVATIONS = ("silu",)
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
)


def dtype_name(dt: Any) -> str:
    """Normalise a dtype-like to ``"float32"`` or ``"bfloat16"`` (ValueError otherwise)."""
    try:
        name = jnp.dtype(dt).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dt!r}; supported: {', '.join(SUPPORTED_DTYPES)}") from e
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return name


def _token_id(x: Any) -> int | tuple[int, ...] | None:
    # Llama-3 instruct configs list several eos ids; a tuple keeps the config hashable.
    if x is None:
        return None
    if isinstance(x, list | tuple):
        ids = tuple(int(i) for i in x)
        return ids[0] if len(ids) == 1 else (ids or None)
    return int(x)


def parse_rope(d: dict) -> tuple[float, str, tuple | None]:
    """``(rope_theta, rope_type, rope_scaling)`` from a config dict, either form."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) or v is None for v in rp.values()):
        # Per-layer-type rope parameters: only a single full-attention entry is supported.
        if set(rp) != {"full_attention"}:
            raise ValueError(
                f"per-layer-type rope_parameters {sorted(rp)} are not supported; "
                "supported: a single rope setting (full attention only)"
            )
        rp = rp["full_attention"]
    params = dict(rp) if rp else dict(d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={partial} is not supported; supported: 1.0 (full rotary)"
        )
    if rope_type == "default":
        return theta, rope_type, None
    vals = dict(params)
    if vals.get("original_max_position_embeddings") is None:
        # transformers falls back on max_position_embeddings for llama3 scaling.
        vals["original_max_position_embeddings"] = d.get("max_position_embeddings")
    missing = [k for k in LLAMA3_KEYS if vals.get(k) is None]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {', '.join(missing)}")
    scaling = {k: float(vals[k]) for k in LLAMA3_KEYS}
    scaling["original_max_position_embeddings"] = int(vals["original_max_position_embeddings"])
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, rope_type, tuple(sorted(scaling.items()))


_POSITIVE_INT_KEYS = (
    *(k for k in REQUIRED_KEYS if k != "rms_norm_eps"),
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def _check_values(d: dict) -> None:
    """Sizes are positive ints and ``rms_norm_eps`` a positive finite number (a config.json
    edited by hand or corrupted gets a message naming the field, not a TypeError)."""
    for k in _POSITIVE_INT_KEYS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"config field {k} must be a positive integer, got {v!r}")
    eps = d["rms_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"config field rms_norm_eps must be a positive number, got {eps!r}")


def parse_common(
    d: dict,
    *,
    family: str,
    param_dtype: Any,
    dtype: Any,
    default_max_positions: int,
    mlp_bias: bool,
) -> ModelConfig:
    """The fields both families share; family modules add their own checks before calling."""
    missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
    if missing:
        raise ValueError(f"{family} config is missing {', '.join(missing)}")
    _check_values(d)
    act = d.get("hidden_act") or "silu"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden_size={hidden} is not a multiple of heads={heads}")
        head_dim = hidden // heads
    if int(head_dim) % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    theta, rope_type, scaling = parse_rope(d)
    return ModelConfig(
        family=family,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(d["rms_norm_eps"]),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings") or default_max_positions),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=mlp_bias,
        bos_token_id=_token_id(d.get("bos_token_id")),
        eos_token_id=_token_id(d.get("eos_token_id")),
        param_dtype=dtype_name(param_dtype),
        dtype=dtype_name(dtype),
    )


def common_to_hf(cfg: ModelConfig) -> dict:
    """The keys both families write, in the transformers 5.x form."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta)}
    rope.update(cfg.rope_scaling_dict())

    def ids(x):
        return list(x) if isinstance(x, tuple) else x

    out = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        # transformers 4.x reads the top-level rope_theta (10000 when absent) and rope_scaling,
        # 5.x rope_parameters (which wins here too, parse_rope): both carry the same values.
        "rope_theta": float(cfg.rope_theta),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "bos_token_id": ids(cfg.bos_token_id),
        "eos_token_id": ids(cfg.eos_token_id),
        "dtype": cfg.param_dtype,
        "use_cache": True,
    }
    if cfg.rope_type != "default":  # transformers 4.x's form of the same scaling
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out
