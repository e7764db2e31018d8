"""Model ports (Llama, Qwen3): HF config dispatch. See ``transformer``, ``params``, ``generate``."""

from __future__ import annotations

from typing import Any

from arhq_jax.models import llama, qwen3
from arhq_jax.models.config import (
    GROUP_OF,
    INPUT_GROUPS,
    PROJECTIONS,
    SUPPORTED_FAMILIES,
    Layer,
    ModelConfig,
    Params,
)

_FAMILIES = {"llama": llama, "qwen3": qwen3}
_BY_ARCHITECTURE = {m.ARCHITECTURE: name for name, m in _FAMILIES.items()}

__all__ = [
    "GROUP_OF",
    "INPUT_GROUPS",
    "PROJECTIONS",
    "SUPPORTED_FAMILIES",
    "Layer",
    "ModelConfig",
    "Params",
    "config_from_hf",
    "config_to_hf",
    "family_of",
]


def family_of(d: dict) -> str:
    """The family of an HF config dict, from ``model_type`` or else ``architectures``."""
    model_type = d.get("model_type")
    if model_type is not None:
        if model_type in _FAMILIES:
            return model_type
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(_FAMILIES)} "
            f"({', '.join(_BY_ARCHITECTURE)})"
        )
    for arch in d.get("architectures") or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise ValueError(
        f"unsupported architecture {d.get('architectures')!r}; supported: "
        f"{', '.join(_BY_ARCHITECTURE)} (model_type {', '.join(_FAMILIES)})"
    )


def config_from_hf(d: dict, *, param_dtype: Any = "float32", dtype: Any = "float32") -> ModelConfig:
    """Parse an HF config.json dict of a supported family (ValueError listing them otherwise)."""
    return _FAMILIES[family_of(d)].config_from_hf(d, param_dtype=param_dtype, dtype=dtype)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict for ``cfg`` that transformers 5.x loads."""
    return _FAMILIES[cfg.family].config_to_hf(cfg)
