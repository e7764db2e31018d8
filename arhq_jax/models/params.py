"""Hugging Face checkpoint names ↔ the ``Params`` pytree (docs/spec/models.md §3).

Weights keep the HF layout ``W[out, in]``. Loading is streaming: ``params_from_tensors`` asks for
one tensor at a time through a ``get(name) -> np.ndarray | None`` callback (a safetensors reader,
a GGUF dequantizer, a torch state dict…), checks its shape against the config and casts it to
``cfg.param_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from arhq_jax.linears.base import Dense
from arhq_jax.models.config import PROJECTIONS, Layer, ModelConfig, Params

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORM_KEYS = {
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}


def linear_key(i: int, proj: str) -> str:
    """HF prefix of projection ``proj`` of layer ``i`` (append ``.weight`` / ``.bias``)."""
    return f"model.layers.{i}.{'self_attn' if proj in _ATTN else 'mlp'}.{proj}"


def norm_key(i: int, norm: str) -> str:
    """HF key of a layer norm weight; ``norm`` is a ``Layer`` field name."""
    return f"model.layers.{i}.{_NORM_KEYS[norm]}.weight"


def has_bias(cfg: ModelConfig, proj: str) -> bool:
    return cfg.attention_bias if proj in _ATTN else cfg.mlp_bias


def _layer_norms(cfg: ModelConfig) -> tuple[str, ...]:
    return (
        ("input_norm", "post_norm", "q_norm", "k_norm")
        if cfg.qk_norm
        else ("input_norm", "post_norm")
    )


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model has, name → shape, in checkpoint order (no lm_head when tied)."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = cfg.linear_shapes()
    out: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        for n in _layer_norms(cfg):
            out[norm_key(i, n)] = (d,) if n in ("q_norm", "k_norm") else (h,)
        for p in PROJECTIONS:
            out[linear_key(i, p) + ".weight"] = shapes[p]
            if has_bias(cfg, p):
                out[linear_key(i, p) + ".bias"] = (shapes[p][0],)
    out[FINAL_NORM] = (h,)
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = (cfg.vocab_size, h)
    return out


def _check(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise ValueError(f"tensor {name!r}: expected a float tensor, got dtype {x.dtype}")
    return x


def tensor_loader(cfg: ModelConfig, get: Callable[[str], np.ndarray | None]):
    """``fetch(name) -> jax.Array``: ``get(name)`` checked against ``expected_tensors`` (shape,
    float dtype, finite) and cast to ``cfg.param_dtype``; ValueError naming the key otherwise."""
    pdt = jnp.dtype(cfg.param_dtype)
    shapes = expected_tensors(cfg)

    def fetch(name: str) -> jax.Array:
        x = get(name)
        if x is None:
            raise ValueError(f"missing tensor {name!r} (expected shape {shapes[name]})")
        arr = jnp.asarray(_check(name, x, shapes[name]).astype(pdt, copy=False))
        if not bool(jnp.isfinite(arr).all()):
            raise ValueError(f"tensor {name!r} has non-finite values (NaN or inf)")
        return arr

    return fetch


def layer_from_tensors(cfg: ModelConfig, i: int, fetch: Callable[[str], jax.Array]) -> Layer:
    """Decoder layer ``i`` from ``fetch`` (``tensor_loader``), one tensor at a time."""

    def linear(p: str) -> Dense:
        key = linear_key(i, p)
        b = fetch(key + ".bias") if has_bias(cfg, p) else None
        return Dense(w=fetch(key + ".weight"), b=b)

    kw = {p: linear(p) for p in PROJECTIONS}
    kw.update({n: fetch(norm_key(i, n)) for n in _layer_norms(cfg)})
    return Layer(**kw)


def params_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray | None]) -> Params:
    """Build ``Params`` by asking ``get`` for each HF key of ``expected_tensors`` one at a time.

    Raises ValueError naming the key for a missing tensor, a wrong shape (expected and actual), a
    non-float dtype or non-finite values. With ``tie_word_embeddings`` the lm_head is tied
    (``Params.lm_head = None``); ``lm_head.weight`` may then be absent (as transformers 5.x saves
    it) or present, in which case it must equal the embeddings (after the cast).
    """
    pdt = jnp.dtype(cfg.param_dtype)
    shapes = expected_tensors(cfg)
    fetch = tensor_loader(cfg, get)
    embed = fetch(EMBED)
    layers = [layer_from_tensors(cfg, i, fetch) for i in range(cfg.num_layers)]
    final_norm = fetch(FINAL_NORM)

    if cfg.tie_word_embeddings:
        lm = get(LM_HEAD)
        if lm is not None:
            lm = jnp.asarray(_check(LM_HEAD, lm, shapes[EMBED]).astype(pdt, copy=False))
            # Compared after the same cast: a bf16 file tied in f32 is still tied.
            if not bool(jnp.array_equal(lm, embed)):
                raise ValueError(TIED_DIFFERS)
        lm_head = None
    else:
        lm = get(LM_HEAD)
        if lm is None:
            raise ValueError(NO_LM_HEAD)
        lm_head = Dense(w=tensor_loader(cfg, lambda _: lm)(LM_HEAD))
    return Params(embed=embed, layers=tuple(layers), final_norm=final_norm, lm_head=lm_head)


TIED_DIFFERS = (
    f"tie_word_embeddings is true but {LM_HEAD!r} differs from {EMBED!r}; "
    "untie the config to keep a separate lm_head"
)
NO_LM_HEAD = (
    f"missing tensor {LM_HEAD!r} and tie_word_embeddings is false "
    "(set tie_word_embeddings=true if the head is tied to the embeddings)"
)


def params_to_tensors(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(HF key, np.ndarray)`` in ``expected_tensors`` order; the inverse of
    ``params_from_tensors``. Arrays keep their parameter dtype (bf16 as ``ml_dtypes.bfloat16``).

    Only float ``Dense`` linears can be written this way (ValueError naming the projection
    otherwise); a tied model yields no ``lm_head.weight``.
    """
    if len(params.layers) != cfg.num_layers:
        raise ValueError(f"params have {len(params.layers)} layers, config says {cfg.num_layers}")
    shapes = expected_tensors(cfg)

    def emit(name: str, x) -> tuple[str, np.ndarray]:
        return name, _check(name, jax.device_get(x), shapes[name])

    def dense(name: str, lin) -> Dense:
        if not isinstance(lin, Dense):
            raise ValueError(
                f"{name}: only float Dense linears can be written as HF tensors, "
                f"got {type(lin).__name__}"
            )
        return lin

    yield emit(EMBED, params.embed)
    for i, layer in enumerate(params.layers):
        for n in _layer_norms(cfg):
            yield emit(norm_key(i, n), getattr(layer, n))
        for p in PROJECTIONS:
            key = linear_key(i, p)
            lin = dense(key, getattr(layer, p))
            yield emit(key + ".weight", lin.w)
            if has_bias(cfg, p):
                if lin.b is None:
                    raise ValueError(f"{key}: the config says it has a bias, the linear has none")
                yield emit(key + ".bias", lin.b)
            elif lin.b is not None:
                raise ValueError(f"{key}: the linear has a bias the config does not declare")
    yield emit(FINAL_NORM, params.final_norm)
    if not cfg.tie_word_embeddings:
        if params.lm_head is None:
            raise ValueError("tie_word_embeddings is false but params.lm_head is None")
        yield emit(LM_HEAD, dense(LM_HEAD, params.lm_head).w)


def random_params(cfg: ModelConfig, key: jax.Array, *, std: float = 0.02) -> Params:
    """Random parameters for tests and benchmarks: weights and biases N(0, std²), norm weights
    1 + N(0, 0.1²) (so that they are not all ones), in ``cfg.param_dtype``."""
    pdt = jnp.dtype(cfg.param_dtype)
    shapes = expected_tensors(cfg)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes)), strict=True))
    tensors = {}
    for name, shape in shapes.items():
        z = jax.random.normal(keys[name], shape, jnp.float32)
        is_norm = name.endswith("norm.weight") or "layernorm" in name
        tensors[name] = np.asarray((1.0 + 0.1 * z) if is_norm else std * z).astype(pdt)
    return params_from_tensors(cfg, tensors.get)
