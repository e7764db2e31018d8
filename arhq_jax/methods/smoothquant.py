"""SmoothQuant (arXiv 2211.10438; docs/spec/methods.md §4): one per-channel scale per foldable
input group.

For an input group (the RMSNorm feeding q/k/v, or the one feeding gate/up),

    m_x[j] = max_t |X_tj|                 (calibration absmax of the group's input)
    m_w[j] = max over all consumers of max_o |W_oj|
    s[j]   = m_x[j]^α / m_w[j]^(1−α),      α = 0.5 by default,

and the scale is folded offline: γ ← γ / s and W ← W diag(s) for every consumer, so the
unquantized output is unchanged and quantization sees the flatter x/s.

Faithfulness:
  - Follows the reference ``smooth_ln_fcs``: m_w is clamped at ≥ 1e-5, the scale at ≥ 1e-5,
    m_x is used as is (a dead channel with m_x = 0 gets s = 1e-5 for α > 0), one s is shared by
    the whole group, α is fixed (no search).
  - The optional extra groups of docs/spec/methods.md §4.5 (not in the original method):
    ``down_proj``'s scale folds
    exactly into ``up_proj``'s output rows (silu(gate)⊙up is linear in up), and ``o_proj``'s
    into ``v_proj``'s rows when the scale is shared by the query heads of each KV head; we take
    the max of m_x and of m_w over each GQA group before forming s (``o_v_scales``).
  - The quantizer (W8A8 int8 in the paper, NVFP4 W4A4 for ARHQ comparisons) is not part of this
    module: quantize the folded weights and the runtime activations with ``formats``.

Statistics needed from calibration: per-channel absmax of each group's input (``qkv``,
``gate_up``; also ``o`` and ``down`` for the optional groups).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from arhq_jax.numerics.formats import div

# Reference clamps (smoothquant/smooth.py): weight absmax and the final scale.
SQ_FLOOR = 1e-5


def _check_vec(name, v, n=None) -> jax.Array:
    v = jnp.asarray(v)
    if v.ndim != 1 or (n is not None and v.shape[0] != n):
        want = f"[{n}]" if n is not None else "1-D"
        raise ValueError(f"{name} must be {want}, got shape {v.shape}")
    return v


def _check_ws(consumer_ws) -> tuple[jax.Array, ...]:
    ws = tuple(jnp.asarray(w) for w in consumer_ws)
    if not ws:
        raise ValueError("consumer_ws is empty: a smoothing group needs at least one consumer")
    for k, w in enumerate(ws):
        if w.ndim != 2:
            raise ValueError(f"consumer_ws[{k}] must be [out, in], got shape {w.shape}")
        if w.shape[1] != ws[0].shape[1]:
            raise ValueError(
                f"consumer_ws[{k}] has in={w.shape[1]}, expected {ws[0].shape[1]} (one group "
                "shares its input)"
            )
    return ws


def consumer_absmax(consumer_ws: Sequence[jax.Array]) -> jax.Array:
    """``m_w [in]``: max over the concatenated consumers (along ``out``) of ``|W[:, j]|``, f32."""
    ws = _check_ws(consumer_ws)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0) for w in ws]), 0)


def scales_from_stats(m_x, m_w, alpha: float = 0.5) -> jax.Array:
    """``s = max(m_x^α / max(m_w, 1e-5)^(1−α), 1e-5)`` ``[in]`` f32."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m_x = _check_vec("act_absmax", m_x).astype(jnp.float32)
    m_w = _check_vec("weight absmax", m_w, m_x.shape[0]).astype(jnp.float32)
    if bool(jnp.any(~jnp.isfinite(m_x))) or bool(jnp.any(m_x < 0)):
        raise ValueError("act_absmax must be finite and non-negative")
    m_w = jnp.maximum(m_w, SQ_FLOOR)
    s = jnp.power(m_x, alpha) / jnp.power(m_w, 1.0 - alpha)
    return jnp.maximum(s, SQ_FLOOR)


def smoothquant_scales(act_absmax, consumer_ws: Sequence[jax.Array], alpha: float = 0.5):
    """The group's SmoothQuant scale ``s [in]`` (f32).

    Args:
      act_absmax: ``[in]`` per-channel max|x| of the group's input over the calibration tokens.
      consumer_ws: the group's consumers ``W [out_k, in]`` (q/k/v, or gate/up), un-smoothed.
      alpha: migration strength (0.5 default; the paper uses ~0.75 for strong outliers).
    """
    ws = _check_ws(consumer_ws)
    m_x = _check_vec("act_absmax", act_absmax, ws[0].shape[1])
    return scales_from_stats(m_x, consumer_absmax(ws), alpha)


def fold_smoothing(norm_w, consumer_ws: Sequence[jax.Array], s):
    """Fold ``s`` into a norm and its consumers: ``(γ / s, [W diag(s) ...])``.

    Shapes and dtypes are kept (the arithmetic is f32, cast back to each input's dtype).
    """
    ws = _check_ws(consumer_ws)
    s = _check_vec("s", s, ws[0].shape[1]).astype(jnp.float32)
    norm_w = _check_vec("norm_w", norm_w, s.shape[0])
    new_norm = (norm_w.astype(jnp.float32) / s).astype(norm_w.dtype)
    new_ws = tuple((w.astype(jnp.float32) * s[None, :]).astype(w.dtype) for w in ws)
    return new_norm, new_ws


def fold_into_producer(producer_w, consumer_w, s, producer_b=None):
    """Fold ``s`` into a linear producer's output rows and its consumer's input columns.

    ``W_p ← diag(1/s) W_p`` (and ``b_p ← b_p / s``), ``W_c ← W_c diag(s)``. Exact for up→down
    (SwiGLU is linear in up) and for v→o when ``s`` is per KV channel (see ``o_v_scales``).

    Args:
      producer_w: ``[n, in_p]``; consumer_w: ``[out_c, m]``; s: ``[n]`` for the producer rows.
        For v→o pass ``s_v [kv_heads·d]`` here and fold ``s_o`` into o yourself, or use
        ``fold_o_v``.
    Returns:
      ``(producer_w, producer_b, consumer_w)`` with the input dtypes.
    """
    producer_w, consumer_w = jnp.asarray(producer_w), jnp.asarray(consumer_w)
    s = _check_vec("s", s, producer_w.shape[0]).astype(jnp.float32)
    if consumer_w.ndim != 2 or consumer_w.shape[1] != s.shape[0]:
        raise ValueError(f"consumer_w must be [out, {s.shape[0]}], got {consumer_w.shape}")
    new_p = div(producer_w, s[:, None]).astype(producer_w.dtype)
    new_b = None
    if producer_b is not None:
        producer_b = _check_vec("producer_b", producer_b, s.shape[0])
        new_b = (producer_b.astype(jnp.float32) / s).astype(producer_b.dtype)
    new_c = (consumer_w.astype(jnp.float32) * s[None, :]).astype(consumer_w.dtype)
    return new_p, new_b, new_c


def _gqa_shape(n, num_heads, num_kv_heads, head_dim):
    if num_heads % num_kv_heads or n != num_heads * head_dim:
        raise ValueError(
            f"[{n}] does not split into num_heads={num_heads} × head_dim={head_dim} with "
            f"num_kv_heads={num_kv_heads}"
        )
    return num_kv_heads, num_heads // num_kv_heads, head_dim


def gqa_group_max(v, num_heads: int, num_kv_heads: int, head_dim: int) -> jax.Array:
    """``[num_heads·d] → [num_kv_heads·d]``: max over the query heads that share a KV head."""
    v = _check_vec("v", v)
    shape = _gqa_shape(v.shape[0], num_heads, num_kv_heads, head_dim)
    return jnp.max(v.reshape(shape), axis=1).reshape(-1)


def expand_kv_to_heads(v_kv, num_heads: int, num_kv_heads: int, head_dim: int) -> jax.Array:
    """``[num_kv_heads·d] → [num_heads·d]``: repeat each KV channel for its query heads."""
    v_kv = _check_vec("v_kv", v_kv, num_kv_heads * head_dim)
    rep = num_heads // num_kv_heads
    return jnp.repeat(v_kv.reshape(num_kv_heads, 1, head_dim), rep, axis=1).reshape(-1)


def o_v_scales(o_act_absmax, o_w, num_heads, num_kv_heads, head_dim, alpha: float = 0.5):
    """GQA-shared scale for the optional v→o group: ``(s_v [kv·d], s_o [heads·d])``.

    m_x and m_w are reduced by max over each GQA group before forming s, so ``s_o`` is equal
    across the query heads of a KV head and ``s_v`` can be folded into v_proj's rows exactly.
    """
    o_w = jnp.asarray(o_w)
    m_x = gqa_group_max(o_act_absmax, num_heads, num_kv_heads, head_dim)
    m_w = gqa_group_max(consumer_absmax([o_w]), num_heads, num_kv_heads, head_dim)
    s_v = scales_from_stats(m_x, m_w, alpha)
    return s_v, expand_kv_to_heads(s_v, num_heads, num_kv_heads, head_dim)


def fold_o_v(v_w, o_w, s_v, s_o, v_b=None):
    """``(v_w / s_v rows, v_b / s_v, o_w · s_o columns)`` from ``o_v_scales``."""
    v_w, o_w = jnp.asarray(v_w), jnp.asarray(o_w)
    s_v = _check_vec("s_v", s_v, v_w.shape[0]).astype(jnp.float32)
    s_o = _check_vec("s_o", s_o, o_w.shape[1]).astype(jnp.float32)
    new_v = div(v_w, s_v[:, None]).astype(v_w.dtype)
    new_b = None if v_b is None else (jnp.asarray(v_b, jnp.float32) / s_v).astype(v_b.dtype)
    new_o = (o_w.astype(jnp.float32) * s_o[None, :]).astype(o_w.dtype)
    return new_v, new_b, new_o
