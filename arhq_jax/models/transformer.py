"""The decoder shared by the Llama and Qwen3 ports (docs/spec/models.md §1-2).

Pure functions over a ``Params`` pytree; ``cfg`` (a hashable ``ModelConfig``) is always static under
``jax.jit``. Shapes: ``B`` batch, ``T`` query tokens, ``S`` key slots (``T`` without a KV cache, the
cache length with one), ``H`` hidden, ``n_h``/``n_kv`` query/KV heads, ``d`` head dim, ``V`` vocab.

dtype policy (HF's): activations are in ``cfg.dtype``; RMSNorm statistics, RoPE tables and the
softmax are computed in f32 and cast back; every matmul accumulates in f32 at HIGHEST precision.
Projections are only ever called (``layer.q_proj(x)``), so any ``Linear`` can replace a ``Dense``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from arhq_jax.models.config import Layer, ModelConfig, Params
from arhq_jax.numerics.elements import HIGHEST

F32 = jnp.float32


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: statistics in f32, cast back to ``x.dtype``, then times ``w`` (not 1 + w).

    ``x``: ``[..., n]`` any float dtype; ``w``: ``[n]``. Returns ``x.dtype``.
    """
    xf = x.astype(F32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return w.astype(x.dtype) * y


@functools.lru_cache(maxsize=64)
def _inv_freq(theta: float, d: int, rope_type: str, scaling: tuple | None) -> np.ndarray:
    # The f32 recipe of HF's rope init functions, op for op. The power runs on XLA's CPU backend
    # (it matches torch's CPU powf, numpy's does not); the rest is IEEE-exact f32 arithmetic in
    # numpy, written as torch evaluates it (``c / t`` is ``reciprocal(t) * c`` in torch).
    # local_devices: under jax.distributed on CPU, devices("cpu")[0] is process 0's.
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
        expo = jnp.arange(0, d, 2, dtype=jnp.int32).astype(F32) / d
        inv = np.asarray(jnp.float32(theta) ** expo)
    one = np.float32(1.0)
    inv = one / inv
    if rope_type == "llama3":
        s = dict(scaling or ())
        factor = np.float32(s["factor"])
        lf, hf = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        l0 = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = l0 / lf, l0 / hf
        wavelen = (one / inv) * np.float32(2 * math.pi)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = ((one / wavelen) * np.float32(l0) - np.float32(lf)) / np.float32(hf - lf)
        smoothed = (one - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif rope_type != "default":
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
    return inv.astype(np.float32)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The RoPE inverse frequencies ``[d/2]`` f32 (incl. llama3 scaling), a host constant."""
    return _inv_freq(float(cfg.rope_theta), cfg.head_dim, cfg.rope_type, cfg.rope_scaling)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[B, T, d]`` in ``cfg.dtype``, for integer ``positions [B, T]``.

    angle = position(f32) × inv_freq(f32); emb = [angle, angle]; cos/sin taken in f32 (times the
    attention scaling, 1.0 for both supported rope types) and then cast to the compute dtype.
    """
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = positions.astype(F32)[..., None] * inv
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb).astype(cfg.dtype), jnp.sin(emb).astype(cfg.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half (NeoX) RoPE: ``x [B, T, n, d]``, ``cos``/``sin [B, T, d]``. Returns x.dtype."""
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + _rotate_half(x) * s


def positions_from_mask(mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Per-sequence positions ``[B, T]`` int32 from a validity mask: valid tokens count up from
    ``start`` (``[B]`` or scalar); padding gets the position of the last valid token (min 0)."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    pos = pos + jnp.asarray(start, jnp.int32).reshape(-1, 1)
    return jnp.maximum(pos, 0)


def attention_bias(
    key_valid: jax.Array, num_queries: int, offset: jax.Array | int, dtype
) -> jax.Array:
    """Additive mask ``[B, T, S]``: 0 where query ``offset + i`` may see key slot ``j`` (``j ≤
    offset + i`` and the slot is valid), the dtype's minimum elsewhere."""
    q_idx = jnp.arange(num_queries, dtype=jnp.int32) + jnp.asarray(offset, jnp.int32)
    k_idx = jnp.arange(key_valid.shape[-1], dtype=jnp.int32)
    allowed = (k_idx[None, :] <= q_idx[:, None])[None] & key_valid.astype(bool)[:, None, :]
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


# Query block of the calibration's causal attention (``layer_forward(causal_block=...)``, which
# ``calibration.calibrate.layer_pass`` passes): block i's queries read only the keys up to the
# block's end, so the upper-triangle blocks (all masked) are never computed. At 512 tokens, 64-token
# blocks do 36/64 of the full square's score and PV FLOPs and exps; on 2 CPU cores (batch 8,
# SmolLM2's 9/3 heads) the attention took 0.30-0.45x the full square's time. A masked score's exp
# is exactly 0, so only rounding can differ: alone the attention gave the same bits at that shape,
# inside the compiled layer XLA fuses it differently (SmolLM2's ARHQ r32 diagnostics moved by
# < 1e-4 relative, e.g. mean max|A| 15.9324 -> 15.9314). The evaluation forward keeps the square:
# its logits are the same bits whatever the batch (tests/calibration/test_global_scales.py), which
# the smaller blocks' matmuls do not keep at every shape.
CAUSAL_BLOCK = 64


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    scale: float,
    causal_block: int = 0,
) -> jax.Array:
    """GQA eager attention as HF computes it.

    ``q [B, T, n_h, d]``, ``k``/``v [B, S, n_kv, d]``, ``bias [B, T, S]`` (q.dtype). Query head h
    reads KV head ``h // (n_h/n_kv)`` (grouped by broadcasting). Returns ``[B, T, n_h·d]``.

    ``causal_block`` > 0 (only with ``S == T`` and a causal ``bias``, query i never seeing key
    j > i): the queries in blocks of that many tokens, block ``[t0, t1)`` against keys
    ``[0, t1)`` only; the keys skipped are the ones ``bias`` masks for every query of the block.
    """
    t = q.shape[1]
    if causal_block <= 0 or t <= causal_block:
        return _attention_block(q, k, v, bias, scale)
    if k.shape[1] != t:
        raise ValueError(f"causal blocks need as many keys as queries, got {k.shape[1]} and {t}")
    outs = []
    for t0 in range(0, t, causal_block):
        t1 = min(t, t0 + causal_block)
        outs.append(_attention_block(q[:, t0:t1], k[:, :t1], v[:, :t1], bias[:, t0:t1, :t1], scale))
    return jnp.concatenate(outs, axis=1)


def _attention_block(q, k, v, bias, scale):
    """``attention`` of every query against every key given (``bias`` masks)."""
    b, t, nh, d = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, t, nkv, nh // nkv, d)
    s = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k, precision=HIGHEST, preferred_element_type=F32
    ).astype(q.dtype)
    s = s * scale + bias[:, None, None]
    p = jax.nn.softmax(s.astype(F32), axis=-1).astype(q.dtype)
    o = jnp.einsum(
        "bkgts,bskd->btkgd", p, v.astype(q.dtype), precision=HIGHEST, preferred_element_type=F32
    ).astype(q.dtype)
    return o.reshape(b, t, nh * d)


def embed(params: Params, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    """Token embeddings: ``ids [B, T]`` int → ``[B, T, H]`` in ``cfg.dtype``."""
    return jnp.take(params.embed, ids, axis=0).astype(cfg.dtype)


def layer_forward(
    layer: Layer,
    cfg: ModelConfig,
    h: jax.Array,
    positions: jax.Array,
    *,
    attn_mask: jax.Array | None = None,
    kv_cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | int | None = None,
    capture: bool = False,
    causal_block: int = 0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, dict[str, jax.Array] | None]:
    """One decoder layer.

    Args:
      h: ``[B, T, H]`` in the compute dtype.
      positions: ``[B, T]`` int RoPE positions.
      attn_mask: validity of the key slots, ``[B, S]`` bool/int (``S = T`` without a cache, the
        cache length with one); None means all valid. Causality is by slot index.
      kv_cache: ``(k, v)``, each ``[B, S_max, n_kv, d]``; k is stored after k_norm and RoPE. The
        new k/v are written at slot ``cache_index`` and attention reads the whole cache.
      capture: also return the input of each input group (see below).
      causal_block: without a KV cache, > 0 runs the attention's queries in blocks of this many
        tokens against the keys up to each block's end only (``attention``; e.g.
        ``CAUSAL_BLOCK``); 0: the full masked square.

    Returns:
      ``(h [B, T, H], new (k, v) or None, captured or None)``; ``captured`` maps ``"qkv"`` (normed
      input of q/k/v) ``[B, T, H]``, ``"o"`` (attention output) ``[B, T, n_h·d]``, ``"gate_up"``
      ``[B, T, H]`` and ``"down"`` (silu(gate)⊙up) ``[B, T, I]``, all in the compute dtype.
    """
    b, t, _ = h.shape
    nh, nkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    cos, sin = rope_tables(cfg, positions)

    a = rms_norm(h, layer.input_norm, eps)
    q = layer.q_proj(a).reshape(b, t, nh, d)
    k = layer.k_proj(a).reshape(b, t, nkv, d)
    v = layer.v_proj(a).reshape(b, t, nkv, d)
    if cfg.qk_norm:
        q = rms_norm(q, layer.q_norm, eps)
        k = rms_norm(k, layer.k_norm, eps)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    if kv_cache is None:
        keys, values, offset, new_cache = k, v, 0, None
        n_keys = t
    else:
        if cache_index is None:
            raise ValueError("layer_forward: kv_cache given without cache_index")
        kc, vc = kv_cache
        idx = jnp.asarray(cache_index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (zero, idx, zero, zero))
        vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (zero, idx, zero, zero))
        keys, values, offset, new_cache = kc, vc, idx, (kc, vc)
        n_keys = kc.shape[1]
    if attn_mask is None:
        attn_mask = jnp.ones((b, n_keys), bool)
    elif attn_mask.shape != (b, n_keys):
        raise ValueError(f"attn_mask has shape {attn_mask.shape}, expected {(b, n_keys)}")
    bias = attention_bias(attn_mask, t, offset, h.dtype)
    # Without a cache the keys are the queries' own tokens: the all-masked key blocks can go.
    block = causal_block if kv_cache is None else 0
    o = attention(q, keys.astype(h.dtype), values, bias, d**-0.5, block)
    h = h + layer.o_proj(o)

    m = rms_norm(h, layer.post_norm, eps)
    gate = layer.gate_proj(m)
    act = jax.nn.silu(gate.astype(F32)).astype(gate.dtype) * layer.up_proj(m)
    h = h + layer.down_proj(act)
    captured = {"qkv": a, "o": o, "gate_up": m, "down": act} if capture else None
    return h, new_cache, captured


layer_forward_jit = jax.jit(layer_forward, static_argnames=("cfg", "capture", "causal_block"))


def head(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Final norm and logits: ``h [B, T, H]`` → ``[B, T, V]`` f32.

    Tied (``params.lm_head is None``): logits = norm(h)·Eᵀ. Logits are rounded to the compute dtype
    first, as HF's lm_head returns them, then widened to f32.
    """
    x = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    if params.lm_head is None:
        logits = jnp.einsum(
            "...h,vh->...v",
            x,
            params.embed.astype(x.dtype),
            precision=HIGHEST,
            preferred_element_type=F32,
        ).astype(x.dtype)
    else:
        logits = params.lm_head(x)
    return logits.astype(F32)


def _forward(params, cfg, ids, positions=None, attn_mask=None):
    if positions is None:
        if attn_mask is None:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        else:
            positions = positions_from_mask(attn_mask)
    h = embed(params, cfg, ids)
    for layer in params.layers:
        h, _, _ = layer_forward(layer, cfg, h, positions, attn_mask=attn_mask)
    return head(params, cfg, h)


# The one compiled forward (public: tests read its cache size to check that nothing recompiles).
forward_jit = jax.jit(_forward, static_argnames=("cfg",))


def forward(
    params: Params,
    cfg: ModelConfig,
    ids: jax.Array,
    *,
    positions: jax.Array | None = None,
    attn_mask: jax.Array | None = None,
) -> jax.Array:
    """Full causal forward (jit-compiled): ``ids [B, T]`` → logits ``[B, T, V]`` f32.

    ``attn_mask [B, T]`` marks valid tokens (left padding: padded keys are masked and positions,
    unless given, count valid tokens per sequence). Logits at padded positions are meaningless.
    """
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, T], got shape {ids.shape}")
    if attn_mask is not None:
        attn_mask = jnp.asarray(attn_mask).astype(bool)
        if attn_mask.shape != ids.shape:
            raise ValueError(f"attn_mask shape {attn_mask.shape} != ids shape {ids.shape}")
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
        if positions.shape != ids.shape:
            raise ValueError(f"positions shape {positions.shape} != ids shape {ids.shape}")
    return forward_jit(params, cfg, ids, positions, attn_mask)
