"""In-register FP4 / FP8 codecs used inside the Pallas kernels (docs/spec/kernels.md §3).

Everything here is integer and f32 arithmetic only: no float8/float4 casts (Triton has no e8m0 type
and casts to e4m3 need CC >= 8.9; Mosaic GPU rejects float4/e8m0 casts below sm_100), no gathers,
no concatenation. The functions take and return plain ``jax.Array`` values and work on any shape, so
the same code runs in ``interpret=True`` on CPU and in the Triton lowering on GPU.

Codes and scale bytes arrive as ``int32`` (upcast from the uint8 refs: Mosaic GPU refuses shifts on
8-bit types).

Divisions: Triton lowers an f32 ``/`` to PTX ``div.full.f32`` (approximate, up to 2 ulp), which
would move block scales and E2M1 roundings at ties. Every quantizer division goes through
``div_rn``: PTX ``div.rn.f32`` (IEEE, correctly rounded) by inline assembly on GPU, and
``formats.div`` (correctly rounded on XLA:CPU) in interpret mode. Divisions by powers of two are
multiplications by the exact reciprocal instead.

The formats themselves are defined in ``arhq_jax/numerics/formats.py`` (spec formats.md); this
module is the
kernel's own encode/decode and is tested against it bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arhq_jax.numerics.elements import div as _xla_div

_F32_ONE_HALF_BITS = 0x3F000000  # bits of 0.5f
_F32_TINY = 2.0**-126
_F32_MAX = float(np.finfo(np.float32).max)
_NV_DIVISOR = 2688.0  # formats.NVFP4_TENSOR_DIVISOR (6 · 448)


def _bits(v: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(v, jnp.int32)


def _f32(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def div_rn(x: jax.Array, y, *, interpret: bool) -> jax.Array:
    """Correctly rounded f32 ``x / y`` (numpy broadcasting) inside a kernel.

    ``interpret=False`` (Triton): inline PTX ``div.rn.f32``; ``interpret=True``: ``formats.div``.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if interpret:
        return _xla_div(x, y)
    from jax.experimental.pallas import triton as pltriton

    shape = jnp.broadcast_shapes(x.shape, y.shape)
    x = jnp.broadcast_to(x, shape)
    y = jnp.broadcast_to(y, shape)
    [q] = pltriton.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[x, y],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return q


def nvfp4_scale_from_amax(t: jax.Array, ct: bool, *, interpret: bool) -> jax.Array:
    """``formats.nvfp4_tensor_scale`` from the amax t (f32, finite, >= 0) inside a kernel, so
    that only XLA's max-reduction runs before kernel 1 (no scalar fusions): "ct" gs =
    fl(2688·fl(1/max(t, 2^-126))), 1 when that overflows; "modelopt" g = fl(t/2688), 1 for t = 0.
    """
    if ct:
        gs = div_rn(1.0, jnp.maximum(t, _F32_TINY), interpret=interpret) * _NV_DIVISOR
        return jnp.where(gs <= _F32_MAX, gs, 1.0)
    return jnp.where(t > 0, div_rn(t, _NV_DIVISOR, interpret=interpret), 1.0)


def nvfp4_decode(ts: jax.Array, ct: bool, *, interpret: bool) -> jax.Array:
    """``formats.nvfp4_decode_scale`` inside a kernel: fl(1/gs) for "ct", g for "modelopt"."""
    return div_rn(1.0, ts, interpret=interpret) if ct else ts


def e2m1_value(code: jax.Array) -> jax.Array:
    """E2M1 code (int32 in [0, 15]) -> its f32 value (docs/spec/formats.md §1), -0 for code 8.

    For m = code & 7 >= 2 the f32 bit pattern is (m << 22) + bits(0.5): the exponent field gets
    (m >> 1) + 126 and the top mantissa bit gets m & 1. m = 0, 1 are 0 and 0.5.
    """
    m = code & 7
    mag = jnp.where(m < 2, m.astype(jnp.float32) * 0.5, _f32((m << 22) + _F32_ONE_HALF_BITS))
    return jnp.where(code >= 8, -mag, mag)


def e2m1_code(v: jax.Array, sign_of: jax.Array | None = None) -> jax.Array:
    """f32 value already clipped to [-6, 6] -> E2M1 code (int32), RNE, -0 -> 8 (as ml_dtypes).

    The magnitude code is the number of grid midpoints below |v|; a tie goes to the even mantissa
    bit, hence ``>`` at midpoints whose lower neighbour is even and ``>=`` at the others.
    ``sign_of`` (nvfp4 "ct"): take the sign from this array instead, set only for a negative
    nonzero value (compressed-tensors: -0.0 -> 0x0, a negative value rounding to zero -> 0x8).
    """
    a = jnp.abs(v)
    m = (
        (a > 0.25).astype(jnp.int32)
        + (a >= 0.75).astype(jnp.int32)
        + (a > 1.25).astype(jnp.int32)
        + (a >= 1.75).astype(jnp.int32)
        + (a > 2.5).astype(jnp.int32)
        + (a >= 3.5).astype(jnp.int32)
        + (a > 5.0).astype(jnp.int32)
    )
    if sign_of is not None:
        b = _bits(sign_of)
        return m | jnp.where((b < 0) & ((b & 0x7FFFFFFF) != 0), 8, 0)
    # The sign bit, not ``v < 0``: -0.0 encodes as 0x8 like the ml_dtypes cast.
    return m | jnp.where(_bits(v) < 0, 8, 0)


def e2m1_round(v: jax.Array) -> jax.Array:
    """f32 value already clipped to [-6, 6] -> the E2M1 value it encodes to, without the code:
    ``e2m1_value(e2m1_code(v))`` up to the sign of zero, in a few float ops.

    The grid has step 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6], so |v| / step rounded to the
    nearest integer, ties to even, times step is the nearest grid value; an even multiple of the
    step is exactly a grid value with an even mantissa bit, so the ties match E2M1's (0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). |v| / step is exact (a power of
    two) and below 2^23. The rounding is ``floor(y + 0.5)`` with the odd ties moved down, as in
    ``e4m3_round``.
    """
    a = jnp.abs(v)
    step = jnp.where(a < 2.0, 0.5, jnp.where(a < 4.0, 1.0, 2.0))
    y = a * jnp.where(a < 2.0, 2.0, jnp.where(a < 4.0, 1.0, 0.5))
    r = jnp.floor(y + 0.5)
    r = jnp.where(((r - y) == 0.5) & ((r.astype(jnp.int32) & 1) == 1), r - 1.0, r)
    q = r * step
    return jnp.where(v < 0, -q, q)


F16_FOLD = 2.0**14  # e2m1_pair_f16 yields E2M1 × 2^-14: fold 2^14 into the block scale


def e2m1_pair_f16(byte: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed byte (uint16, value in [0, 255]) -> its low and high E2M1 nibbles as float16 values
    E2M1 × 2^-14, with 3 integer ops per nibble (shift, shift, and-or) and no float arithmetic.

    The nibble's bits s e1 e0 m are moved into the fp16 pattern s 000 e1e0 m 000000000: the fp16
    exponent field is e (bias 15) and the top mantissa bit m, so the value is 2^(e-15)·(1 + m/2)
    for e >= 1 and the subnormal 0.5·2^-14 for code 1, i.e. exactly E2M1 × 2^-14 (the Marlin
    decode, with fp16 in place of bf16: the fp16 subnormal of code 1 is a normal f32 after the
    conversion, while a bf16 subnormal would be flushed by XLA:CPU). It is the interpret-mode
    decode of ``e2m1_pair_bf16_scaled``, which multiplies it by the block scale in f32 (exact: at
    most 6 significant bits); the GPU form is the inline PTX below.
    """
    b = byte.astype(jnp.uint16)
    sign, mag = jnp.uint16(0x8000), jnp.uint16(0x0E00)
    lo = ((b << 12) & sign) | ((b << 9) & mag)
    hi = ((b << 8) & sign) | ((b << 5) & mag)
    return (
        jax.lax.bitcast_convert_type(lo, jnp.float16),
        jax.lax.bitcast_convert_type(hi, jnp.float16),
    )


# The weight decode on packed words, as PTX: Triton's ``pack=4`` for uint8 hands one 32-bit register
# $2 holding four code bytes q = b3 b2 b1 b0. ``prmt`` moves b0, b1 into bytes 1 and 3 of t (b2, b3
# likewise), so each byte's high nibble sits at bits 12-15 of a 16-bit half (``t << 4`` brings the
# low nibble there); then one register holds a pair of nibbles, decoded by the Marlin step below.
# jax's lowering takes one result per inline-asm op, so the low and high nibbles are two ops; the
# outputs are $0 = (b0, b1), $1 = (b2, b3), two 16-bit values each (earlier kernels stopped at the
# fp16 pattern E2M1 × 2^-14 of ``e2m1_pair_f16``, shift 3, and converted in f32 afterwards).
#
# The nvfp4 weight decode straight to bf16 with the block scale applied (Marlin's bf16 form): per
# pair of nibbles, (t & 0x80008000) | ((t & 0x70007000) >> 6) puts e1e0 in the low bits of the
# bf16 exponent and m on top of the mantissa, i.e. E2M1 × 2^-126 (codes ±1 as the bf16 subnormal
# 0.5 · 2^-126), and ``mul.rn.bf16x2`` by the prescaled block scale S · 2^119 (``$3``, ``$4``: two
# per register, in the order of the code bytes) gives E2M1 · S · 2^-7: exact (at most 6
# significant bits) and normal (>= 2^-17), so the bf16 MMA takes the registers as they are and
# only the multiply sees a subnormal input (PTX half-precision arithmetic keeps subnormals; the
# bf16 forms have no .ftz). 2^7 (``BF16_FOLD``) is undone on the accumulator. 10 + 8 + 4
# instructions per 8 weights, and no f32 conversions.
_E2M1_SCALED_PTX = """{{
.reg .b32 t, m;
prmt.b32 t, $2, 0, 0x1404;{shl}
and.b32 m, t, 0x70007000;
shr.b32 m, m, 6;
lop3.b32 t, t, 0x80008000, m, 0xEA;
mul.rn.bf16x2 $0, t, $3;
prmt.b32 t, $2, 0, 0x3424;{shl}
and.b32 m, t, 0x70007000;
shr.b32 m, m, 6;
lop3.b32 t, t, 0x80008000, m, 0xEA;
mul.rn.bf16x2 $1, t, $4;
}}"""
E2M1_LO_SCALED_PTX = _E2M1_SCALED_PTX.format(shl="\nshl.b32 t, t, 4;")
E2M1_HI_SCALED_PTX = _E2M1_SCALED_PTX.format(shl="")
# mxfp4: the block scale 2^(b - 127) spans more than one bf16 multiplier can carry, so two
# power-of-two multipliers (``e8m0_bf16_factors``: $3, $4 then $5, $6) bring E2M1 × 2^-126 to
# E2M1 × 2^(b - 127), exact and normal for b >= 2 (every intermediate is normal or the final
# value): 10 + 8 + 8 instructions per 8 weights.
_E2M1_SCALED2_PTX = _E2M1_SCALED_PTX.replace(
    "mul.rn.bf16x2 $0, t, $3;", "mul.rn.bf16x2 t, t, $3;\nmul.rn.bf16x2 $0, t, $5;"
).replace("mul.rn.bf16x2 $1, t, $4;", "mul.rn.bf16x2 t, t, $4;\nmul.rn.bf16x2 $1, t, $6;")
E2M1_LO_SCALED2_PTX = _E2M1_SCALED2_PTX.format(shl="\nshl.b32 t, t, 4;")
E2M1_HI_SCALED2_PTX = _E2M1_SCALED2_PTX.format(shl="")
BF16_FOLD = 2.0**7  # e2m1_pair_bf16_scaled yields E2M1 · S · 2^-7
_BF16_PRESCALE = 2.0**119  # S · 2^119 <= 448 · 2^119 < 2^128: a finite bf16


def e4m3_bf16_prescaled(byte: jax.Array) -> jax.Array:
    """Non-negative E4M3 scale byte (int32) -> S · 2^119 as bfloat16 (exact: 4 significant bits,
    in [2^110, 2^128)), the multiplier of ``E2M1_LO_SCALED_PTX``.

    ``byte << 7`` read as fp16 bits is S · 2^-8 exactly (E4M3's exponent and mantissa fields land
    on fp16's low exponent bits and top mantissa bits; bias 15 instead of 7), subnormal bytes
    included (fp16 subnormal (m << 7) · 2^-24 = m · 2^-9 · 2^-8). Widened to f32 (exact), × 2^127
    (normal) and rounded to bf16 (exact): four ops, no selects.
    """
    s16 = jax.lax.bitcast_convert_type((byte << 7).astype(jnp.uint16), jnp.float16)
    return (s16.astype(jnp.float32) * (_BF16_PRESCALE * 2.0**8)).astype(jnp.bfloat16)


def e8m0_bf16_factors(byte: jax.Array) -> tuple[jax.Array, jax.Array]:
    """E8M0 scale byte b (int32) -> the two bf16 powers of two 2^a, 2^c (a = min(b - 1, 126),
    c = max(b - 127, 0), a + c = b - 1) by which ``E2M1_LO_SCALED2_PTX`` multiplies E2M1 × 2^-126:
    both normal for every b, and the intermediate E2M1 × 2^(a - 126) is the final value (b < 127)
    or E2M1 itself (b >= 127). Built as bf16 bits."""
    a = jnp.minimum(byte - 1, 126) + 127
    c = jnp.maximum(byte - 127, 0) + 127
    return tuple(
        jax.lax.bitcast_convert_type((v << 7).astype(jnp.uint16), jnp.bfloat16) for v in (a, c)
    )


def e2m1_pair_bf16_scaled(
    byte: jax.Array, scale: jax.Array, *, interpret: bool, scale2: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The nvfp4 weight operand: low and high nibbles of a uint8 tile as bf16 E2M1 · S · 2^-7,
    given ``scale`` = ``e4m3_bf16_prescaled`` of each byte's block (bf16, byte's shape).

    With ``scale2`` (mxfp4: ``scale``, ``scale2`` = ``e8m0_bf16_factors``) the result is
    E2M1 × scale × scale2 × 2^-126 = E2M1 × 2^(b - 127).

    On GPU one inline-PTX op per nibble (``E2M1_LO_SCALED_PTX`` / ``E2M1_HI_SCALED_PTX``, or the
    ``SCALED2`` forms; four bytes and four scales per asm instance); in interpret mode the same
    values from the fp16 decode in f32 (no bf16 subnormal, which XLA:CPU would flush). All
    products are exact (powers of two, or at most 6 significant bits), so both give the same
    bits.
    """
    if interpret:
        # scale · 2^-112 × (E2M1 · 2^-14) = E2M1 · scale · 2^-126, as the PTX computes it
        s = scale.astype(jnp.float32) * (2.0**-112)
        lo, hi = e2m1_pair_f16(byte)
        lo, hi = lo.astype(jnp.float32) * s, hi.astype(jnp.float32) * s
        if scale2 is not None:
            s2 = scale2.astype(jnp.float32)
            lo, hi = lo * s2, hi * s2
        return lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16)
    from jax.experimental.pallas import triton as pltriton

    b = byte.astype(jnp.uint8)
    out = [jax.ShapeDtypeStruct(byte.shape, jnp.bfloat16)]
    if scale2 is None:
        asms, args, cons = (E2M1_LO_SCALED_PTX, E2M1_HI_SCALED_PTX), [b, scale], "=r,=r,r,r,r"
    else:
        asms = (E2M1_LO_SCALED2_PTX, E2M1_HI_SCALED2_PTX)
        args, cons = [b, scale, scale2], "=r,=r,r,r,r,r,r"
    res = []
    for asm in asms:
        [v] = pltriton.elementwise_inline_asm(
            asm, args=args, constraints=cons, pack=4, result_shape_dtypes=out
        )
        res.append(v)
    return res[0], res[1]


def bf16_parts(xs: jax.Array, n: int) -> list[jax.Array]:
    """f32 ``xs`` -> ``n`` bf16 arrays whose f32 sum is xs (exactly for n = 3: 3 × 8 significant
    bits cover f32's 24; each remainder xs - Σ parts is exact in f32)."""
    out, rest = [], xs
    for _ in range(n):
        p = rest.astype(jnp.bfloat16)
        out.append(p)
        rest = rest - p.astype(jnp.float32)
    return out


def e4m3_value(byte: jax.Array) -> jax.Array:
    """Non-negative E4M3 scale byte (int32) -> f32 (docs/spec/formats.md §2). Scales carry no sign
    or NaN.

    Normal bytes map to f32 bits ((e + 120) << 23) | (m << 20); subnormals (e = 0) are m * 2**-9,
    computed without f32 subnormals (XLA:CPU and GPUs may flush them).
    """
    e = (byte >> 3) & 0xF
    m = byte & 7
    normal = _f32(((e + 120) << 23) | (m << 20))
    return jnp.where(e == 0, m.astype(jnp.float32) * (2.0**-9), normal)


def e8m0_value(byte: jax.Array) -> jax.Array:
    """E8M0 byte (int32) -> 2**(byte - 127) in f32. Byte 0 is 2**-127 (f32 bits 0x00400000)."""
    return _f32(jnp.where(byte == 0, 0x00400000, byte << 23))


def e4m3_round(v: jax.Array) -> jax.Array:
    """Round f32 ``v`` in [0, 448] to the nearest E4M3 value, ties to even (the ml_dtypes cast).

    The quantum of E4M3 near v is 2**(max(floor(log2 v), -6) - 3); y = v / quantum < 16 is exact
    and is rounded to an integer by floor(y + 0.5) with ties moved down to the even integer, then
    scaled back (exact: powers of two). (The magic-number trick (y + 1.5·2^23) - 1.5·2^23 is not
    usable: XLA simplifies it away.)
    """
    exp = jnp.maximum(((_bits(v) >> 23) & 0xFF) - 127, -6) - 3
    q = _f32((exp + 127) << 23)
    y = v * _f32((127 - exp) << 23)  # v / q, exact (Triton's f32 ``/`` is approximate)
    r = jnp.floor(y + 0.5)
    odd_tie = ((r - y) == 0.5) & ((r.astype(jnp.int32) & 1) == 1)
    return jnp.where(odd_tie, r - 1.0, r) * q


def e4m3_byte(s: jax.Array) -> jax.Array:
    """An f32 that is exactly a non-negative E4M3 value -> its byte (int32)."""
    b = _bits(s)
    normal = ((((b >> 23) & 0xFF) - 120) << 3) | ((b >> 20) & 7)
    sub = (s * 512.0).astype(jnp.int32)  # s = m * 2**-9 with m in 0..8 (8 is byte 0x08 = 2**-6)
    return jnp.where(s < 2.0**-6, sub, normal)


def e8m0_floor_byte(amax: jax.Array) -> jax.Array:
    """MXFP4 floor-rule scale byte from a block max (docs/spec/formats.md §5): e = floor(log2 a) -
    2.

    With E the f32 biased exponent, floor(log2 a) = E - 127 for normal a, and the clamp e >= -127
    covers a = 0 and subnormal a (both give byte 0). The upper clamp (e <= 127) cannot trigger.
    """
    biased = (_bits(amax) >> 23) & 0xFF
    return jnp.maximum(biased - 2, 0)
