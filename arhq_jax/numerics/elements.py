"""Element codecs shared by the formats, the baselines and the kernels (docs/spec/formats.md §1,
§7).

* E2M1 (FP4): ``e2m1_encode`` (RNE, saturating), ``e2m1_encode_ties_down`` (nvfp4-paper),
  ``e2m1_decode`` (arithmetic, no float4 cast); all are comparisons and integer ops only.
* Packing: ``pack_nibbles`` / ``unpack_nibbles``, element 2i in the low nibble.
* ``div``: correctly rounded f32 division (XLA would otherwise multiply by a reciprocal).
* ``pow2`` / ``exponent``: exact powers of two and floor(log2) for normal f32 values.

``arhq_jax.numerics.formats`` re-exports all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The matmul precision of every calibration, decomposition and reference matmul (one definition).
HIGHEST = jax.lax.Precision.HIGHEST

# E2M1 value of each 4-bit code (code 8 is -0).
E2M1_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32
)
# nvfp4-paper's ordered codebook; the reference's own export stores indices into it.
PAPER_CODEBOOK = np.array(
    [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32
)
# E2M1 code of each PAPER_CODEBOOK entry (zero is always 0x0).
PAPER_INDEX_TO_CODE = np.array(
    [0xF, 0xE, 0xD, 0xC, 0xB, 0xA, 0x9, 0x0, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7], dtype=np.uint8
)


def e2m1_encode(v: jax.Array) -> jax.Array:
    """E2M1 codes of ``v`` (any shape, float) by RNE, saturating at ±6; uint8, same shape.

    Matches the ml_dtypes f32 -> float4_e2m1fn cast bit for bit: negative values (and -0) that
    round to zero give 0x8, ±inf gives ±6, NaN gives 0x8. Pure comparisons, so it lowers anywhere
    (Pallas included).
    """
    v = jnp.asarray(v, jnp.float32)
    m = jnp.abs(v)
    # Rounding thresholds; ">=" where the tie goes up (to the even mantissa), ">" where it stays.
    k = (
        (m > 0.25).astype(jnp.uint8)
        + (m >= 0.75)
        + (m > 1.25)
        + (m >= 1.75)
        + (m > 2.5)
        + (m >= 3.5)
        + (m > 5.0)
    ).astype(jnp.uint8)
    sign = jnp.signbit(v).astype(jnp.uint8) << 3
    return jnp.where(jnp.isnan(v), jnp.uint8(8), k | sign)


_PAPER_MIDPOINTS = (
    -5.0,
    -3.5,
    -2.5,
    -1.75,
    -1.25,
    -0.75,
    -0.25,
    0.25,
    0.75,
    1.25,
    1.75,
    2.5,
    3.5,
    5.0,
)


def e2m1_ties_down_index(v: jax.Array) -> jax.Array:
    """Index into PAPER_CODEBOOK of the nearest value, ties to the smaller one; int32, same shape.

    ``v`` is clipped to [-6, 6] first; NaN gives the index of 0.
    """
    v = jnp.clip(jnp.asarray(v, jnp.float32), -6.0, 6.0)
    idx = sum((v > t).astype(jnp.int32) for t in _PAPER_MIDPOINTS)
    return jnp.where(jnp.isnan(v), 7, idx)


def e2m1_encode_ties_down(v: jax.Array) -> jax.Array:
    """E2M1 codes of ``v`` rounded ties-down (nvfp4-paper, docs/spec/formats.md §1); uint8, same
    shape. Zero is 0x0."""
    return jnp.asarray(PAPER_INDEX_TO_CODE)[e2m1_ties_down_index(v)]


def e2m1_decode(codes: jax.Array) -> jax.Array:
    """f32 values of E2M1 ``codes`` (uint8, any shape; bits above 3 ignored), without a float4 cast.

    |v| = 0 (m=0), 0.5 (m=1), 2^((m>>1)-1) * (1 + (m&1)/2) (m>=2) with m = code & 7; code 8 is -0.
    """
    c = jnp.asarray(codes).astype(jnp.int32)
    m = c & 7
    e = (m >> 1) - 1
    normal = jnp.where(e >= 0, jnp.left_shift(1, jnp.maximum(e, 0)), 1).astype(jnp.float32) * (
        1.0 + 0.5 * (m & 1).astype(jnp.float32)
    )
    mag = jnp.where(m == 0, 0.0, jnp.where(m == 1, 0.5, normal))
    return jnp.where((c & 8) != 0, -mag, mag)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Pack 4-bit codes ``[..., K]`` (K even) into uint8 ``[..., K/2]``, element 2i low nibble."""
    codes = jnp.asarray(codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last axis, got shape {codes.shape}")
    c = codes.astype(jnp.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """Unpack uint8 ``[..., K/2]`` into codes uint8 ``[..., K]`` (low nibble first)."""
    p = jnp.asarray(packed).astype(jnp.uint8)
    return jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def div(x, y) -> jax.Array:
    """Correctly rounded f32 ``x / y`` with numpy broadcasting.

    XLA's algebraic simplifier rewrites ``x / broadcast(y)`` (a scalar, a literal, or a per-block
    ``[..., nb, 1]`` divisor) as ``x * (1/y)``, which is off by one ulp about half the time and
    would move E2M1/int roundings at ties. Hiding the broadcast behind an optimization barrier
    keeps a true division; the result equals numpy's f32 division bit for bit.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    shape = jnp.broadcast_shapes(x.shape, y.shape)
    x = jnp.broadcast_to(x, shape)
    # An all-zero int32 mask that depends on x (so it is batched like x under vmap), opaque to
    # the simplifier; OR-ing it in makes the divisor an ordinary array instead of a broadcast.
    mask = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(x, jnp.int32) & 0)
    yb = jax.lax.bitcast_convert_type(jnp.broadcast_to(y, shape), jnp.int32) | mask
    return x / jax.lax.bitcast_convert_type(yb, jnp.float32)


def pow2(n: jax.Array) -> jax.Array:
    """Exact f32 2^n for integer n in [-126, 127] (built from the exponent bits)."""
    bits = (jnp.asarray(n, jnp.int32) + 127) << 23
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def exponent(y: jax.Array) -> jax.Array:
    """floor(log2 y) for positive normal f32 y, exactly (frexp exponent - 1); int32."""
    return jnp.frexp(y)[1] - 1
