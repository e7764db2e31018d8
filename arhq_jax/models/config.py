"""Model configuration and parameter pytrees shared by the Llama and Qwen3 ports.

``ModelConfig`` is a frozen, hashable dataclass, so it can be a static argument of ``jax.jit``.
``Params`` and ``Layer`` are pytrees (``flax.struct``); their projections follow the ``Linear``
interface of ``arhq_jax.linears.base``, so quantized linears drop in with
``layer.replace(q_proj=...)``.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

from arhq_jax.linears.base import Linear

SUPPORTED_FAMILIES = ("llama", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# The seven projections of a decoder layer, in the order a layer runs them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input share their calibration statistics.
INPUT_GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {p: g for g, ps in INPUT_GROUPS.items() for p in ps}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, read from config.json or GGUF metadata (never defaulted).

    ``rope_scaling`` is a tuple of (key, value) pairs (hashable) or None; for llama3 scaling it
    holds factor, low_freq_factor, high_freq_factor and original_max_position_embeddings.
    """

    family: str  # "llama" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_dtype: str = "float32"  # dtype the parameters are stored in
    dtype: str = "float32"  # compute dtype of activations

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"unsupported architecture {self.family!r}; "
                f"supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {self.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of each projection."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (self.num_heads * d, h),
            "k_proj": (self.num_kv_heads * d, h),
            "v_proj": (self.num_kv_heads * d, h),
            "o_proj": (h, self.num_heads * d),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def check_positions(self, n: int, what: str, *, allow_long: bool = False) -> str | None:
        """Check that ``n`` positions (``what``, e.g. "seq_len 1024") fit the model's context.

        Returns None when ``n ≤ max_position_embeddings``. Beyond it, raises ValueError, unless
        ``allow_long``: then returns a one-line warning for the caller to show (RoPE runs at
        any position, but the model was not trained there).
        """
        m = self.max_position_embeddings
        if n <= m:
            return None
        msg = f"{what} needs {n} positions, beyond the model's max_position_embeddings {m}"
        if not allow_long:
            raise ValueError(f"{msg} (allow_long=True, --allow-long, runs it anyway)")
        return f"{msg}; results past position {m} are untrained extrapolation"


@struct.dataclass
class Layer:
    """One decoder layer. Norm weights are ``[H]`` (``[d]`` for q_norm/k_norm, Qwen3 only)."""

    input_norm: jax.Array
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    post_norm: jax.Array
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


@struct.dataclass
class Params:
    """A whole model: ``embed [V, H]``, the layers, ``final_norm [H]`` and ``lm_head``.

    ``lm_head`` is None when the embeddings are tied (logits use ``embed``).
    """

    embed: jax.Array
    layers: tuple[Layer, ...]
    final_norm: jax.Array
    lm_head: Linear | None = None


def config_to_dict(cfg: ModelConfig) -> dict:
    """The one JSON codec of ``ModelConfig`` (its fields; ``rope_scaling`` as a list of pairs).

    ``config_from_dict`` is its inverse; the HF ``config.json`` form is ``models.hf_config``."""
    d = dataclasses.asdict(cfg)
    d["rope_scaling"] = None if cfg.rope_scaling is None else [list(kv) for kv in cfg.rope_scaling]
    return d


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of ``config_to_dict`` (ValueError for an unknown field)."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown ModelConfig fields in metadata: {sorted(unknown)}")
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(d.get(k), list):  # several eos ids: a tuple keeps the config hashable
            d[k] = tuple(d[k])
    return ModelConfig(**d)
