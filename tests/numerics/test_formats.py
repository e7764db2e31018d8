"""Tests of arhq_jax.numerics.formats: docs/spec/formats.md §10 vectors and independent
numpy/ml_dtypes
references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arhq_jax.numerics import formats as F

F32 = np.float32
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
FP4 = ml_dtypes.float4_e2m1fn


# Jitted element codecs (each eager jnp op would be dispatched one by one).
J_e2m1_encode = jax.jit(F.e2m1_encode)
J_e2m1_encode_ties_down = jax.jit(F.e2m1_encode_ties_down)
J_e2m1_decode = jax.jit(F.e2m1_decode)
J_pack_nibbles = jax.jit(F.pack_nibbles)
J_unpack_nibbles = jax.jit(F.unpack_nibbles)


def bits(a) -> np.ndarray:
    """Bit pattern of a float array (compares -0/+0 and NaN payloads exactly)."""
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bitwise(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b))


def nibbles(hexstr: str) -> list[int]:
    return [int(c, 16) for c in hexstr.split()]


def u8(a) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


# ------------------------------------------------------------------------------------------
# Independent numpy / ml_dtypes references (float32 arithmetic, as the spec prescribes)
# ------------------------------------------------------------------------------------------


def _pad_last(x, b, mode="constant"):
    k = x.shape[-1]
    kp = -(-k // b) * b
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kp - k)], mode=mode)


def ref_nvfp4(x, g=None):
    x = np.asarray(x, F32)
    k = x.shape[-1]
    if g is None:
        t = np.abs(x).max()
        g = F32(t) / F32(2688) if t > 0 else F32(1)
    g = F32(g)
    xb = _pad_last(x, 16).reshape(*x.shape[:-1], -1, 16)
    a = np.abs(xb).max(-1, keepdims=True)
    s = np.clip((a / F32(6)) / g, 0, 448).astype(E4M3)
    d = s.astype(F32) * g
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d > 0, xb / d, F32(0))
    q = np.clip(v, -6, 6).astype(FP4)
    y = (q.astype(F32) * d).reshape(*x.shape[:-1], -1)[..., :k]
    return y, s[..., 0], q.view(np.uint8)


def ref_nvfp4_ct(x, gs=None):
    """compressed-tensors' NVFP4 arithmetic written out in numpy f32 (generate_gparam,
    calculate_qparams, _quantize / _dequantize, cast_to_fp4, pack_fp4_to_uint8)."""
    x = np.asarray(x, F32)
    k = x.shape[-1]
    if gs is None:
        t = np.float32(np.abs(x).max())
        with np.errstate(over="ignore", divide="ignore"):
            gs = (F32(1) / np.maximum(t, np.finfo(F32).tiny)) * F32(2688)  # torch's 2688 / t
        gs = F32(1) if not np.isfinite(gs) else gs
    gs = F32(gs)
    xb = _pad_last(x, 16).reshape(*x.shape[:-1], -1, 16)
    a = np.abs(xb).max(-1, keepdims=True)
    s = np.clip(gs * (a / F32(6)), -448, 448).astype(E4M3).astype(F32)
    s = np.where(s == 0, F32(0.125), s)
    d = (s / gs).astype(F32)
    v = np.clip(xb / d, -6, 6)
    mag = np.abs(v).astype(FP4).view(np.uint8)  # RNE, as cast_to_fp4's thresholds
    code = mag | np.where(np.sign(xb) < 0, 8, 0).astype(np.uint8)  # torch.sign: -0.0 -> +
    y = (F.E2M1_VALUES[code] * d).reshape(*x.shape[:-1], -1)[..., :k]
    return y, s[..., 0].astype(E4M3), code, gs


_CB = np.array([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def ref_ties_down(v):
    v = np.clip(np.asarray(v, np.float64), -6, 6)
    return _CB[np.argmin(np.abs(v[..., None] - _CB), axis=-1)]  # argmin: first (smallest) on ties


def _paper_blocks(xb):
    a = np.maximum(np.abs(xb).max(-1, keepdims=True), F32(1e-12))
    y = a / F32(6)
    e = np.frexp(y)[1].astype(np.int64) - 1
    step = np.ldexp(np.ones_like(y), e - 3)
    s = np.maximum((np.round(y / step) * step).astype(F32), F32(1e-12))
    return (ref_ties_down(np.clip(xb / s, -6, 6)) * s).astype(F32)


def ref_paper(x, tile=False):
    x = np.asarray(x, F32)
    n, k = x.shape[-2], x.shape[-1]
    if not tile:
        xb = _pad_last(x, 16).reshape(*x.shape[:-1], -1, 16)
        return _paper_blocks(xb).reshape(*x.shape[:-1], -1)[..., :k]
    xp = _pad_last(_pad_last(x, 16).T, 16).T
    tiles = xp.reshape(xp.shape[0] // 16, 16, xp.shape[1] // 16, 16).transpose(0, 2, 1, 3)
    y = _paper_blocks(tiles.reshape(*tiles.shape[:2], 256)).reshape(tiles.shape)
    return y.transpose(0, 2, 1, 3).reshape(xp.shape)[:n, :k]


def ref_mxfp4(x, rule="floor"):
    x = np.asarray(x, F32)
    k = x.shape[-1]
    xb = _pad_last(x, 32).reshape(*x.shape[:-1], -1, 32).astype(np.float64)
    a = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        if rule == "floor":
            e = np.floor(np.log2(a)) - 2
        else:
            e = np.ceil(np.log2(a / 6))
    e = np.where(a > 0, np.clip(e, -127, 127), -127)
    scale = 2.0**e
    q = np.clip(xb / scale, -6, 6).astype(F32).astype(FP4)
    y = (q.astype(np.float64) * scale).astype(F32).reshape(*x.shape[:-1], -1)[..., :k]
    return y, (e[..., 0] + 127).astype(np.uint8)


def ref_int(x, bits_, group, symmetric, variant="default"):
    x = np.asarray(x, F32)
    k = x.shape[-1]
    g = k if group == -1 else group
    xb = _pad_last(x, g, "edge" if variant == "fprag" else "constant")
    xb = xb.reshape(*x.shape[:-1], -1, g)
    if symmetric:
        qmax = 2 ** (bits_ - 1) - 1
        qmin = -qmax if variant == "serq" else -qmax - 1
        a = np.abs(xb).max(-1, keepdims=True)
        sc = np.where(a > 0, a / F32(qmax), F32(1)).astype(F32)
        q = np.clip(np.round(xb / sc), qmin, qmax) + F32(0)  # integer q: no -0
        y = q * sc
    else:
        qmax = 2**bits_ - 1
        lo, hi = xb.min(-1, keepdims=True), xb.max(-1, keepdims=True)
        if variant == "fprag":
            sc = np.maximum((hi - lo) / F32(qmax), F32(1e-8)).astype(F32)
        else:
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
            same = lo == hi
            lo, hi = np.where(same, F32(-1), lo), np.where(same, F32(1), hi)
            sc = ((hi - lo) / F32(qmax)).astype(F32)
        z = np.clip(np.round(-lo / sc), 0, qmax).astype(F32)
        if variant == "fprag":
            q = np.clip(np.round(xb / sc + z), 0, qmax)
        else:
            q = np.clip(np.round(xb / sc) + z, 0, qmax)
        y = (q + F32(0) - z) * sc  # integer codes: no -0
    return y.astype(F32).reshape(*x.shape[:-1], -1)[..., :k]


def rand_weights(rng, shape, outliers=True, tiny_blocks=True):
    """Gaussian data with a few large outliers and some blocks scaled down by 1e-3..1e-6."""
    x = rng.standard_normal(shape).astype(F32)
    if outliers:
        idx = rng.choice(x.size, size=max(1, x.size // 200), replace=False)
        x.reshape(-1)[idx] *= F32(40)
    if tiny_blocks:
        flat = x.reshape(-1, x.shape[-1])
        for r in rng.choice(flat.shape[0], size=max(1, flat.shape[0] // 4), replace=False):
            c = 16 * rng.integers(0, max(1, flat.shape[1] // 16))  # a whole 16-block
            flat[r, c : c + 16] *= F32(10.0 ** -rng.integers(3, 7))
    return x


# ------------------------------------------------------------------------------------------
# E2M1 element codec
# ------------------------------------------------------------------------------------------


def test_e2m1_grid_points_and_decode():
    codes = np.arange(16, dtype=np.uint8)
    dec = np.asarray(J_e2m1_decode(jnp.asarray(codes)))
    assert_bitwise(dec, codes.view(FP4).astype(F32))  # ml_dtypes' own decode, -0 included
    assert_bitwise(dec, F.E2M1_VALUES)
    # Every grid value encodes to its own code (RNE and ties-down; paper's zero is 0x0).
    np.testing.assert_array_equal(np.asarray(J_e2m1_encode(jnp.asarray(dec))), codes)
    td = np.asarray(J_e2m1_encode_ties_down(jnp.asarray(dec)))
    np.testing.assert_array_equal(td, np.where(codes == 8, 0, codes))


def test_e2m1_ties_table_of_spec():
    x = [0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 1.75, 2.5, -2.5, 3.5, -3.5, 5, -5, 6.5, 0.3]
    rne_codes = [0, 8, 2, 0xA, 2, 0xA, 4, 4, 0xC, 6, 0xE, 6, 0xE, 7, 1]
    tdown = [0, -0.5, 0.5, -1, 1, -1.5, 1.5, 2, -3, 3, -4, 4, -6, 6, 0.5]
    xs = jnp.asarray(np.array(x, F32))
    np.testing.assert_array_equal(np.asarray(J_e2m1_encode(xs)), rne_codes)
    got = np.asarray(J_e2m1_decode(J_e2m1_encode_ties_down(xs)))
    np.testing.assert_array_equal(got, np.array(tdown, F32))
    # All midpoints, both signs, both rules (ties-down against a brute-force argmin).
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], F32)
    allm = np.concatenate([mids, -mids])
    np.testing.assert_array_equal(
        np.asarray(J_e2m1_encode(jnp.asarray(allm))), allm.astype(FP4).view(np.uint8)
    )
    got = np.asarray(J_e2m1_decode(J_e2m1_encode_ties_down(jnp.asarray(allm))))
    np.testing.assert_array_equal(got, ref_ties_down(allm).astype(F32))


def test_e2m1_encode_matches_ml_dtypes_cast():
    rng = np.random.default_rng(0)
    v = np.concatenate(
        [
            rng.uniform(-8, 8, 20000).astype(F32),
            rng.standard_normal(5000).astype(F32) * F32(0.3),
            np.array([0.0, -0.0, np.inf, -np.inf, 6.0, -6.0, 7.9, 1e-30, -1e-30], F32),
            np.nextafter(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5], F32), F32(0)),
            np.nextafter(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5], F32), F32(9)),
        ]
    )
    v = np.concatenate([v, -v])
    np.testing.assert_array_equal(
        np.asarray(J_e2m1_encode(jnp.asarray(v))), v.astype(FP4).view(np.uint8)
    )
    # NaN encodes as -0 (0x8), like the cast of a positive NaN.
    assert (
        int(J_e2m1_encode(jnp.float32(np.nan)))
        == 8
        == np.array(np.nan, F32).astype(FP4).view(np.uint8)
    )
    # Ties-down against brute force on the same values (clipped first).
    fin = v[np.isfinite(v)]
    td = np.asarray(J_e2m1_decode(J_e2m1_encode_ties_down(jnp.asarray(fin))))
    np.testing.assert_array_equal(td, ref_ties_down(fin).astype(F32) + F32(0))  # -0 -> +0


def test_pack_unpack_golden_and_roundtrip():
    codes = nibbles("7 E 5 4 3 2 A 0 0 9 4 F 6 0 A 6")
    packed = np.asarray(J_pack_nibbles(jnp.asarray(np.array(codes, np.uint8))))
    assert packed.tobytes() == bytes.fromhex("E7 45 23 0A 90 F4 06 6A")
    rng = np.random.default_rng(1)
    c = rng.integers(0, 16, (3, 5, 18)).astype(np.uint8)
    p = J_pack_nibbles(jnp.asarray(c))
    assert p.shape == (3, 5, 9) and p.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(J_unpack_nibbles(p)), c)
    # Same order as JAX's bitcast of float4 pairs ("even column low").
    f4 = jnp.asarray(c.view(FP4).reshape(3, 5, 9, 2))
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(f4, jnp.uint8)), np.asarray(p)
    )
    with pytest.raises(ValueError, match="even"):
        F.pack_nibbles(jnp.zeros((3,), jnp.uint8))


# ------------------------------------------------------------------------------------------
# Worked examples of docs/spec/formats.md §10
# ------------------------------------------------------------------------------------------

N1 = [10.5, -7, 5.25, 3.5, 2.625, 1.75, -1.3125, 0.4375, 0, -0.875, 4.375, -10.5, 6.125, 0.21875,
      -2.1875, 8.75]  # fmt: skip
N2 = [1, -0.5, 0.25, 0.1, 0.171875, -0.34375, 0.6, 0, -1, 0.75, 0.03, 0.9, -0.2578125, 0.5, 0.4,
      -0.0859375]  # fmt: skip
N3 = [0.859375, 0.5, -0.3, 0.2, 0.1, 0.05, -0.6, 0.7] + [0] * 7 + [-0.859375]


def test_nvfp4_n1_n2_n3():
    """docs/spec/formats.md §10 vectors: the ModelOpt convention ("nvfp4-modelopt")."""
    x = np.array(N1 + N2 + N3, F32)
    q = F.quantize(x, "nvfp4-modelopt")
    assert float(q.tensor_scale) == 2.0**-8
    np.testing.assert_array_equal(u8(q.scales), [0x7E, 0x63, 0x61])
    assert np.asarray(q.scales).astype(F32).tolist() == [448, 44, 36]
    codes = np.asarray(J_unpack_nibbles(q.codes))
    want = nibbles("7 E 5 4 3 2 A 0 0 9 4 F 6 0 A 6  7 D 3 1 2 C 5 0 F 6 0 7 B 5 4 9"
                   "  7 6 C 3 1 1 E 6 0 0 0 0 0 0 0 F")  # fmt: skip
    np.testing.assert_array_equal(codes, want)
    assert np.asarray(q.codes)[:8].tobytes() == bytes.fromhex("E7 45 23 0A 90 F4 06 6A")
    xh = [10.5, -7, 5.25, 3.5, 2.625, 1.75, -1.75, 0, 0, -0.875, 3.5, -10.5, 7, 0, -1.75, 7,
          1.03125, -0.515625, 0.2578125, 0.0859375, 0.171875, -0.34375, 0.515625, 0, -1.03125,
          0.6875, 0, 1.03125, -0.2578125, 0.515625, 0.34375, -0.0859375,
          0.84375, 0.5625, -0.28125, 0.2109375, 0.0703125, 0.0703125, -0.5625, 0.5625]  # fmt: skip
    xh += [0] * 7 + [-0.84375]
    np.testing.assert_array_equal(np.asarray(F.dequantize(q)), np.array(xh, F32))
    assert_bitwise(F.fake_quant(x, "nvfp4-modelopt"), F.dequantize(q))
    assert_bitwise(F.fake_quant(x, "nvfp4-modelopt"), ref_nvfp4(x)[0])


def test_nvfp4_n4_subnormal_and_flushed_scales():
    x = np.array(
        [2688, -1344] + [0] * 14 + [0.01, -0.004] + [0] * 14 + [0.0005, 0.0001] + [0] * 14, F32
    )
    q = F.quantize(x, "nvfp4-modelopt")
    assert float(q.tensor_scale) == 1.0
    np.testing.assert_array_equal(u8(q.scales), [0x7E, 0x01, 0x00])
    assert np.asarray(q.scales).astype(F32)[1] == 2.0**-9
    codes = np.asarray(J_unpack_nibbles(q.codes))
    assert codes[[0, 1, 16, 17, 32, 33]].tolist() == [7, 0xD, 7, 0xC, 0, 0]
    y = np.asarray(F.dequantize(q))
    assert y[[0, 1, 16, 17, 32, 33]].tolist() == [2688, -1344, 0.01171875, -0.00390625, 0, 0]
    assert not y[32:].any()


def test_nvfp4_paper_p1_p2_p3():
    p1 = np.array(
        [6, 0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 1.75, 2.5, -2.5, 3.5, -3.5, 5, -5, 4.5, 0], F32
    )
    q = F.quantize(p1, "nvfp4-paper")
    assert np.asarray(q.scales).tolist() == [1.0] and q.scales.dtype == jnp.float32
    want = [6, 0, -0.5, 0.5, -1, 1, -1.5, 1.5, 2, -3, 3, -4, 4, -6, 4, 0]
    assert_bitwise(F.dequantize(q), np.array(want, F32))
    # The RNE alternative of the spec, for contrast: the same scaled values through e2m1_encode.
    rne = np.asarray(J_e2m1_decode(J_e2m1_encode(jnp.asarray(p1))))
    np.testing.assert_array_equal(rne, [6, 0, -0.0, 1, -1, 1, -1, 2, 2, -2, 4, -4, 4, -4, 4, 0])

    p2 = np.array([7, 1, -3.3, 0.3, 2.2, -0.07, 5.5, 0.6] + [0] * 8, F32)
    q = F.quantize(p2, "nvfp4-paper")
    assert np.asarray(q.scales).tolist() == [1.125]
    codes = np.asarray(J_unpack_nibbles(q.codes))
    np.testing.assert_array_equal(F.E2M1_VALUES[codes][:8], [6, 1, -3, 0.5, 2, 0, 4, 0.5])
    want = [6.75, 1.125, -3.375, 0.5625, 2.25, 0, 4.5, 0.5625] + [0] * 8
    assert_bitwise(F.dequantize(q), np.array(want, F32))

    for p3 in (np.full(16, 1e-30, F32), np.zeros(16, F32)):
        q = F.quantize(p3, "nvfp4-paper")
        assert np.asarray(q.scales).tolist() == [F32(1e-12)]
        assert_bitwise(F.dequantize(q), np.zeros(16, F32))
    # The 1e-12 floor: |x| <= 2.5e-13 becomes 0, 3e-13 does not.
    y = np.asarray(F.fake_quant(np.array([2.5e-13, 3e-13] + [0] * 14, F32), "nvfp4-paper"))
    assert y[0] == 0 and y[1] == F32(5e-13)


M1 = [7.5, 6.9, -6.5, 0.25, 0.75, 2.5, 3.5, 5, -0.3, 1.25]


def test_mxfp4_m1_floor_and_ceil():
    x = np.array(M1 + [0] * 22, F32)
    q = F.quantize(x, "mxfp4")
    assert q.scales.dtype == jnp.float8_e8m0fnu and u8(q.scales).tolist() == [0x7F]
    y = np.asarray(F.dequantize(q))
    assert_bitwise(y[:10], np.array([6, 6, -6, 0, 1, 2, 4, 4, -0.5, 1], F32))
    q = F.quantize(x, "mxfp4", scale_rule="ceil")
    assert u8(q.scales).tolist() == [0x80]
    codes = np.asarray(J_unpack_nibbles(q.codes))
    assert_bitwise(F.E2M1_VALUES[codes][:10], np.array([4, 3, -3, 0, 0.5, 1, 2, 2, -0.0, 0.5], F32))
    y = np.asarray(F.dequantize(q))
    assert_bitwise(y[:10], np.array([8, 6, -6, 0, 1, 2, 4, 4, -0.0, 1], F32))
    assert not y[10:].any()


def test_mxfp4_m2_m3():
    x = np.array([0.1, -0.05, 0.03] + [0] * 29, F32)
    q = F.quantize(x, "mxfp4")
    assert u8(q.scales).tolist() == [0x79]
    codes = np.asarray(J_unpack_nibbles(q.codes))
    np.testing.assert_array_equal(F.E2M1_VALUES[codes][:3], [6, -3, 2])
    np.testing.assert_array_equal(
        np.asarray(F.dequantize(q))[:3], np.array([0.09375, -0.046875, 0.03125], F32)
    )
    for rule in ("floor", "ceil"):
        q = F.quantize(np.zeros(32, F32), "mxfp4", scale_rule=rule)
        assert u8(q.scales).tolist() == [0x00]  # 2^-127, never 0xFF
        assert_bitwise(F.dequantize(q), np.zeros(32, F32))


@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_mxfp4_tiny_blocks_byte_zero(rule):
    """Blocks near the bottom of f32 (amax < 2^-124 floor, < 6·2^-126 ceil): E8M0 byte 0x00 or
    0x01 as the OCP rule gives, and values value·2^-127 that are normal f32 survive (only
    results that are themselves subnormal flush to 0). Regressions: XLA folded 2^-64·2^-63 into a
    flushed constant (floor: everything 0); a/6 flushed to 0 gave byte 0x7F (ceil)."""
    t = F32(2.0**-126)
    x = np.zeros((4, 32), F32)
    x[0, :4] = [3 * t, -t, 2 * t, 2.5 * t]  # floor: byte 0
    x[1, :3] = [5 * t, -4 * t, 3 * t]  # ceil: a/6 = 0.83·2^-126 -> byte 1
    x[2, :3] = [2.5 * t, -2 * t, 1.5 * t]  # ceil: byte 0
    x[3, :3] = [1.2 * t, t, -1.1 * t]  # ceil: log2(a/6) < -128, clamped to byte 0
    want, want_byte = ref_mxfp4(x, rule)
    q = F.quantize(x, "mxfp4", scale_rule=rule)
    got_byte = u8(q.scales)[:, 0]
    np.testing.assert_array_equal(got_byte, want_byte[:, 0])
    assert got_byte.max() <= 1
    y = np.asarray(F.dequantize(q))
    sub = (want != 0) & (np.abs(want) < t)
    np.testing.assert_array_equal(y[~sub], want[~sub])
    assert not y[sub].any()
    assert np.count_nonzero(y) >= 5  # normal results exist and are not flushed
    assert_bitwise(F.fake_quant(x, "mxfp4", scale_rule=rule), y)


def test_mxfp4_clipping_band():
    """Floor rule: |x|/X in (6, 8) saturates to 6 (up to 25 % loss); ceil rule never clips."""
    rng = np.random.default_rng(2)
    p = (2.0 ** rng.integers(-5, 5, (64, 1))).astype(F32)
    x = rng.uniform(-1, 1, (64, 32)).astype(F32) * p
    x[:, 0] = rng.uniform(6.01, 7.99, 64).astype(F32) * p[:, 0]
    yf = np.asarray(F.fake_quant(x, "mxfp4"))
    e = np.floor(np.log2(np.abs(x).max(1))) - 2
    np.testing.assert_array_equal(yf[:, 0], 6 * 2.0**e)  # every block max clipped
    qc = F.quantize(x, "mxfp4", scale_rule="ceil")
    ratio = np.abs(x).max(1) / 2.0 ** (u8(qc.scales)[:, 0].astype(np.int64) - 127)
    assert np.all((ratio > 3) & (ratio <= 6))  # ceil: the max never exceeds 6 X
    assert_bitwise(F.dequantize(qc), ref_mxfp4(x, "ceil")[0])


def test_int_examples_i1_i2():
    i1 = np.array([3.5, -1.75, 0.25, 1.25, -0.75, 0, 2, -3.5], F32)
    q = F.quantize(i1, "int4", group_size=8)
    assert np.asarray(q.scales).tolist() == [0.5] and q.zeros is None
    np.testing.assert_array_equal(np.asarray(J_unpack_nibbles(q.codes)), nibbles("7 C 0 2 E 0 4 9"))
    assert np.asarray(q.codes).tobytes() == bytes.fromhex("C7 20 0E 94")
    np.testing.assert_array_equal(
        np.asarray(F.dequantize(q)), np.array([3.5, -2, 0, 1, -1, 0, 2, -3.5], F32)
    )

    i2 = np.array([-1.5, 0, 0.25, 6, 2.75, -0.75, 1, 3.3], F32)
    q = F.quantize(i2, "int4-asym", group_size=8)
    assert np.asarray(q.scales).tolist() == [0.5] and np.asarray(q.zeros).tolist() == [3]
    assert q.zeros.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(J_unpack_nibbles(q.codes)), [0, 3, 3, 15, 9, 1, 5, 10])
    np.testing.assert_array_equal(
        np.asarray(F.dequantize(q)), np.array([-1.5, 0, 0, 6, 3, -1, 1, 3.5], F32)
    )
    q = F.quantize(i2, "int4-asym", group_size=8, int_rule="fprag")
    np.testing.assert_array_equal(np.asarray(J_unpack_nibbles(q.codes)), [0, 3, 4, 15, 8, 2, 5, 10])
    np.testing.assert_array_equal(
        np.asarray(F.dequantize(q)), np.array([-1.5, 0, 0.5, 6, 2.5, -0.5, 1, 3.5], F32)
    )


def test_sign_magnitude_gptq_rule_and_int8_codes():
    x = np.array([3.5, -3.5, -1.75, 0.25, 1.25, -0.75, 0, 2], F32)
    q = F.quantize(x, "int4", group_size=8, sign_magnitude=True)
    np.testing.assert_array_equal(
        np.asarray(J_unpack_nibbles(q.codes)), [7, 0xF, 0xC, 0, 2, 0xA, 0, 4]
    )
    assert_bitwise(F.dequantize(q), F.fake_quant(x, "int4", group_size=8))  # same values
    q8 = F.quantize(x, "int8", group_size=8)
    assert q8.codes.dtype == jnp.int8 and q8.codes.shape == (8,)
    np.testing.assert_array_equal(np.asarray(q8.codes), np.round(x / (F32(3.5) / F32(127))))
    # gptq: amax clamped at 1e-5, so tiny groups keep their own (tiny) scale per the 1e-5 floor.
    t = np.array([1e-7, -2e-7] + [0] * 6, F32)
    q = F.quantize(t, "int4", group_size=8, int_rule="gptq")
    assert q.int_rule == "gptq" and q.spec == F.resolve_format("int4", group_size=8)
    assert np.asarray(q.scales)[0] == F32(F32(1e-5) / F32(7))
    np.testing.assert_array_equal(np.asarray(F.dequantize(q)), np.zeros(8, F32))
    q = F.quantize(t, "int4", group_size=8)
    assert np.asarray(q.scales)[0] == F32(F32(2e-7) / F32(7))


def test_cast_checks():
    assert np.array([449, 464, 465], F32).astype(E4M3).astype(F32)[:2].tolist() == [448, 448]
    assert np.isnan(np.array(465, F32).astype(E4M3).astype(F32))
    via_jax = jnp.array([449, 464, 465], jnp.float32).astype(jnp.float8_e4m3fn)
    assert u8(via_jax)[:2].tolist() == [0x7E, 0x7E]
    assert np.isnan(np.asarray(via_jax.astype(jnp.float32))[2])
    e8 = np.array([0, 1.5, 2.0**-128], F32).astype(E8M0)
    assert e8.view(np.uint8).tolist() == [0xFF, 0x80, 0x00]
    assert np.array(np.nan, F32).astype(FP4).view(np.uint8) == 8
    # bf16 double rounding: 0.2501 -> 0.5 from f32, -> 0 through bf16.
    v = jnp.float32(0.2501)
    assert float(J_e2m1_decode(J_e2m1_encode(v))) == 0.5
    assert float(J_e2m1_decode(J_e2m1_encode(v.astype(jnp.bfloat16).astype(jnp.float32)))) == 0.0
    # A bf16 input is quantized from its f32 upcast: equal to the f32 numpy reference.
    rng = np.random.default_rng(11)
    xb = jnp.asarray(rand_weights(rng, (32, 64))).astype(jnp.bfloat16)
    for fmt, ref in (("nvfp4-modelopt", ref_nvfp4), ("nvfp4", ref_nvfp4_ct)):
        y = F.fake_quant(xb, fmt)
        want = ref(np.asarray(xb.astype(jnp.float32)))[0]
        assert y.dtype == jnp.bfloat16
        assert_bitwise(y, np.asarray(jnp.asarray(want).astype(jnp.bfloat16)))


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,kw,scale_bytes_or_values",
    [
        ("nvfp4-modelopt", {}, ("u8", 0x00)),
        ("nvfp4", {}, ("u8", 0x20)),  # compressed-tensors' placeholder 0.125
        ("nvfp4-paper", {}, ("f", F32(1e-12))),
        ("mxfp4", {}, ("u8", 0x00)),
        ("int4", {}, ("f", 1.0)),
        ("int4-asym", {}, ("f", F32(2 / 15))),
        ("int8", {}, ("f", 1.0)),
    ],
)
def test_all_zero_blocks(fmt, kw, scale_bytes_or_values):
    x = np.zeros((3, 128), F32)
    x[0, :5] = [1, -2, 3, 0.5, 0.25]
    q = F.quantize(x, fmt, **kw)
    kind, want = scale_bytes_or_values
    s = np.asarray(q.scales)
    s_zero = u8(s)[1:] if kind == "u8" else s[1:]
    assert np.all(s_zero == want)
    y = np.asarray(F.dequantize(q))
    assert not y[1:].any() and np.all(np.isfinite(y))
    if fmt == "int4-asym":
        # lo=-1, hi=1: scale = fl32(2/15) rounds up, so -lo/scale = 7.4999995 and z = 7.
        assert np.all(np.asarray(q.zeros)[1:] == 7)
    want_g = {"nvfp4-modelopt": F32(3) / F32(2688), "nvfp4": F32(2688) / F32(3)}.get(fmt, F32(1))
    assert np.asarray(q.tensor_scale) == want_g
    q0 = F.quantize(np.zeros((2, 40), F32), fmt, **kw)  # all-zero tensor: g = 1 for nvfp4
    assert float(q0.tensor_scale) == 1.0
    assert_bitwise(F.dequantize(q0), np.zeros((2, 40), F32))


def test_nvfp4_e4m3_saturation_with_static_tensor_scale():
    # g fixed small: raw = (a/6)/g far above 448 -> the scale saturates at 448 (clip before cast,
    # not NaN), and elements above 6*d clip to 6.
    x = np.array([100, -50, 1, 0.5] + [0] * 12 + [0.2, 0.1] + [0] * 14, F32)
    g = 2.0**-6
    q = F.quantize(x, "nvfp4-modelopt", tensor_scale=g)
    assert float(q.tensor_scale) == g
    assert u8(q.scales).tolist() == [0x7E, 0x41]  # 448, and 0.2/6*64 = 2.133 -> 2.25
    y = np.asarray(F.dequantize(q))
    d = 448 * g
    assert y[:4].tolist() == [6 * d, -6 * d, 0.0, 0.0]  # 100/7, -50/7 clip to ±6; 1/7 -> 0
    assert_bitwise(y, ref_nvfp4(x, g)[0])
    # Boundary raws just above 448: 449..464 would cast to 448, 465 to NaN without the clip.
    for raw in (449.0, 464.0, 465.0, 1e6):
        xx = np.array([raw * 6] + [0] * 15, F32)
        for fmt in ("nvfp4-modelopt", "nvfp4"):
            qq = F.quantize(xx, fmt, tensor_scale=1.0)
            assert u8(qq.scales).tolist() == [0x7E]


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("nvfp4", {}),
        ("nvfp4-paper", {}),
        ("nvfp4-paper", {"tile": (16, 16)}),
        ("mxfp4", {}),
        ("mxfp4", {"scale_rule": "ceil"}),
        ("int4", {"group_size": 32}),
        ("int4-asym", {"group_size": 32}),
        ("int4-asym", {"group_size": 32, "int_rule": "fprag"}),
        ("int8", {"group_size": 32}),
    ],
)
def test_nan_and_inf_poison_only_their_block(fmt, kw):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 64)).astype(F32)
    xn = x.copy()
    xn[1, 3] = np.nan
    xn[20, 40] = np.inf
    y = np.asarray(F.fake_quant(xn, fmt, **kw))
    b = 16 if fmt.startswith("nvfp4") else 32
    bad = np.zeros_like(x, bool)
    if kw.get("tile"):
        bad[0:16, 0:16] = bad[16:32, 32:48] = True
    else:
        bad[1, 3 // b * b : 3 // b * b + b] = bad[20, 40 // b * b : 40 // b * b + b] = True
    assert np.all(np.isnan(y[bad])) and np.all(np.isfinite(y[~bad]))
    # The other blocks are untouched (nvfp4's tensor max ignores non-finite values).
    clean = np.where(np.isfinite(xn), xn, F32(0))
    yc = np.asarray(F.fake_quant(clean, fmt, **kw))
    assert_bitwise(y[~bad], yc[~bad])
    # Under jit, quantize keeps the NaN and dequantize still equals fake_quant.
    q = jax.jit(lambda a: F.quantize(a, fmt, **kw))(jnp.asarray(xn))
    assert_bitwise(F.dequantize(q), y)
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize(xn, fmt, **kw)


# ------------------------------------------------------------------------------------------
# Packed round trip, layouts, references
# ------------------------------------------------------------------------------------------

ROUNDTRIP = [
    ("nvfp4", {}),
    ("nvfp4-paper", {}),
    ("nvfp4-paper", {"tile": (16, 16)}),
    ("mxfp4", {}),
    ("mxfp4", {"scale_rule": "ceil"}),
    ("int4", {}),
    ("int4", {"group_size": 7}),
    ("int4", {"group_size": -1}),
    ("int4", {"sign_magnitude": True, "group_size": 16}),
    ("int4", {"int_rule": "gptq", "group_size": 16}),
    ("int4-asym", {"group_size": 32}),
    ("int4-asym", {"group_size": 32, "int_rule": "fprag"}),
    ("int4-asym", {"group_size": -1, "int_rule": "gptq"}),
    ("int8", {}),
    ("int8-asym", {"group_size": 64}),
]


@pytest.mark.parametrize(
    "fmt,kw,shape,axis",
    [(f, kw, sh, ax) for f, kw in ROUNDTRIP for sh, ax in (((37, 5), 0), ((2, 33, 3), 1))],
)
def test_packed_roundtrip_bitwise(fmt, kw, shape, axis):
    if kw.get("tile") and len(shape) != 2:
        shape, axis = (33, 20), -1  # tiles are for 2-D weights
    rng = np.random.default_rng(4)
    x = rand_weights(rng, shape, tiny_blocks=False)
    q = F.quantize(x, fmt, axis=axis, **kw)
    fmt_kw = {k: v for k, v in kw.items() if k != "int_rule"}  # the rule is not the format's
    spec = F.resolve_format(fmt, **fmt_kw)
    assert q.spec == spec and q.int_rule == kw.get("int_rule", "default")
    k = shape[axis]
    kp = F.padded_length(k, spec)
    moved = list(shape)
    moved.append(moved.pop(axis % len(shape)))
    lead = tuple(moved[:-1])
    if spec.tile:
        lead = (-(-lead[0] // 16) * 16,)
    ncode = (kp + 1) // 2 if spec.packed else kp
    assert q.codes.shape == lead + (ncode,)
    assert q.codes.dtype == (jnp.int8 if spec.name == "int8" and spec.symmetric else jnp.uint8)
    b = kp if spec.block == -1 else spec.block
    want_scales = (lead[0] // 16, kp // 16) if spec.tile else lead + (kp // b,)
    assert q.scales.shape == want_scales and q.scales.dtype == spec.scale_dtype
    assert (q.zeros is None) == spec.symmetric
    assert q.shape == shape and q.axis == axis % len(shape) and q.dtype == "float32"
    n = q.codes.nbytes + q.scales.nbytes + (0 if q.zeros is None else q.zeros.nbytes)
    assert q.nbytes == n + (4 if spec.name == "nvfp4" else 0)
    # Padded codes are 0.
    codes = np.asarray(J_unpack_nibbles(q.codes) if spec.packed else q.codes)
    assert not codes[..., k:].any()
    y = F.dequantize(q)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert_bitwise(y, F.fake_quant(x, fmt, axis=axis, **kw))
    # Round trip through the pytree (e.g. jit boundaries, checkpoints).
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert_bitwise(F.dequantize(jax.tree_util.tree_unflatten(tree, leaves)), y)


def test_nvfp4_matches_numpy_reference():
    rng = np.random.default_rng(5)
    for shape in ((48, 256), (7, 3, 50)):
        x = rand_weights(rng, shape)
        y, s, _ = ref_nvfp4(x)
        assert_bitwise(F.fake_quant(x, "nvfp4-modelopt"), y)
        q = F.quantize(x, "nvfp4-modelopt")
        np.testing.assert_array_equal(u8(q.scales), s.view(np.uint8))
        assert (s.astype(F32) < 2.0**-6).any() and (s.astype(F32) == 0).any()  # tiny blocks occur
    # axis=0 and a static tensor scale.
    x = rand_weights(rng, (64, 40))
    assert_bitwise(F.fake_quant(x, "nvfp4-modelopt", axis=0), ref_nvfp4(x.T)[0].T)
    assert_bitwise(F.fake_quant(x, "nvfp4-modelopt", tensor_scale=0.01), ref_nvfp4(x, 0.01)[0])


def test_nvfp4_ct_matches_numpy_reference():
    """The default nvfp4 (compressed-tensors convention) against compressed-tensors' arithmetic
    written out in numpy: scales, codes (sign rule included), decoded values, tensor scale."""
    rng = np.random.default_rng(15)
    for shape in ((48, 256), (7, 3, 50)):
        x = rand_weights(rng, shape)
        x.reshape(-1)[::7] *= F32(1e-4)  # negative values that round to zero (code 0x8)
        x.reshape(-1)[3::11] = F32(-0.0)  # -0.0 encodes as 0x0
        y, s, code, gs = ref_nvfp4_ct(x)
        q = F.quantize(x, "nvfp4")
        assert float(q.tensor_scale) == float(gs)
        np.testing.assert_array_equal(u8(q.scales), s.view(np.uint8))
        got = np.asarray(J_unpack_nibbles(q.codes)).reshape(code.shape)
        np.testing.assert_array_equal(got, code)
        assert (code == 8).any() and (s.astype(F32) == 0.125).any()
        assert_bitwise(F.dequantize(q), y)
        assert_bitwise(F.fake_quant(x, "nvfp4"), y)
    x = rand_weights(rng, (64, 40))
    assert_bitwise(F.fake_quant(x, "nvfp4", axis=0), ref_nvfp4_ct(x.T)[0].T)
    assert_bitwise(F.fake_quant(x, "nvfp4", tensor_scale=300.0), ref_nvfp4_ct(x, 300.0)[0])


def test_nvfp4_conventions_differ_and_tensor_scales():
    x = np.array(N1 + N2 + N3, F32)
    assert float(F.nvfp4_tensor_scale(x)) == 256.0  # gs = 2688 / 10.5
    # gs = fl(2688 · fl(1/t)) as torch computes 2688 / t, not fl(2688 / t): 1536.0001 for t = 1.75
    assert F.nvfp4_tensor_scale(np.float32(1.75)) == (F32(1) / F32(1.75)) * F32(2688) != 1536
    assert float(F.nvfp4_tensor_scale(x, "nvfp4-modelopt")) == 2.0**-8
    assert float(F.nvfp4_tensor_scale(np.float32(10.5))) == 256.0  # a calibrated amax
    assert float(F.nvfp4_tensor_scale(np.zeros(4, F32))) == 1.0
    assert float(F.nvfp4_tensor_scale(np.float32(1e-37))) == 1.0  # 2688/amax overflows: 1
    assert float(F.nvfp4_decode_scale(256.0)) == 2.0**-8
    assert float(F.nvfp4_decode_scale(2.0**-8, "nvfp4-modelopt")) == 2.0**-8
    spec = F.resolve_format("nvfp4-modelopt")
    assert spec.name == "nvfp4" and spec.convention == "modelopt" and spec.label == spec_label(spec)
    assert (
        F.resolve_format("nvfp4").convention == "ct" and F.resolve_format("nvfp4").label == "nvfp4"
    )
    assert F.resolve_format("nvfp4", convention="modelopt") == spec
    with pytest.raises(ValueError, match="convention"):
        F.resolve_format("nvfp4", convention="fp8")
    with pytest.raises(ValueError, match="convention applies to nvfp4 only"):
        F.resolve_format("mxfp4", convention="ct")
    # Where the powers of two make both conventions exact, they agree bit for bit.
    assert_bitwise(F.fake_quant(x, "nvfp4"), F.fake_quant(x, "nvfp4-modelopt"))
    # On bf16-like weights the decode d = fl(s / gs) differs from fl(s * g) by an ulp on many
    # blocks (how many depends on amax: 77 % of the values for this seed).
    rng = np.random.default_rng(2)
    w = np.asarray(jnp.asarray(rng.standard_normal((64, 256)) * 0.02, jnp.bfloat16), F32)
    a, b = np.asarray(F.fake_quant(w, "nvfp4")), np.asarray(F.fake_quant(w, "nvfp4-modelopt"))
    assert 0.1 < np.mean(a != b) < 0.95
    qa, qb = F.quantize(w, "nvfp4"), F.quantize(w, "nvfp4-modelopt")
    same_s = np.repeat(u8(qa.scales) == u8(qb.scales), 16, axis=-1)
    assert 0 < np.sum(~same_s) < 0.01 * w.size  # block scales move only at (near-)ties
    same = same_s & (
        np.asarray(J_unpack_nibbles(qa.codes)) == np.asarray(J_unpack_nibbles(qb.codes))
    )
    assert 0 < np.sum(~same) < 0.01 * w.size  # and so do codes
    assert np.all(np.abs(a - b)[same] <= 2.0**-23 * np.abs(b)[same])  # the rest: one ulp


def spec_label(spec) -> str:
    return "nvfp4-modelopt" if spec.convention == "modelopt" else "nvfp4"


def test_dynamic_tensor_scale_couples_the_batch():
    rng = np.random.default_rng(6)
    tok = rng.standard_normal((1, 64)).astype(F32)
    batch = np.concatenate([tok, 50 * rng.standard_normal((3, 64)).astype(F32)])
    alone = np.asarray(F.fake_quant(tok, "nvfp4"))
    inbatch = np.asarray(F.fake_quant(batch, "nvfp4"))[:1]
    assert not np.array_equal(alone, inbatch)
    g = float(F.nvfp4_tensor_scale(tok))
    assert_bitwise(F.fake_quant(batch, "nvfp4", tensor_scale=g)[:1], F.fake_quant(tok, "nvfp4"))


def test_nvfp4_paper_matches_numpy_reference_1d_and_tiles():
    rng = np.random.default_rng(7)
    x = rand_weights(rng, (37, 70))
    x[3, :16] = 1e-13  # below the 1e-12 floor
    assert_bitwise(F.fake_quant(x, "nvfp4-paper"), ref_paper(x))
    yt = F.fake_quant(x, "nvfp4-paper", tile=(16, 16))
    assert_bitwise(yt, ref_paper(x, tile=True))
    q = F.quantize(x, "nvfp4-paper", tile=(16, 16))
    assert q.scales.shape == (3, 5) and q.codes.shape == (48, 40)
    # A tile's rows share a scale: the 16x16 result differs from the 1-D one.
    assert not np.array_equal(np.asarray(yt), np.asarray(F.fake_quant(x, "nvfp4-paper")))


def test_mxfp4_and_int_match_numpy_reference():
    rng = np.random.default_rng(8)
    x = rand_weights(rng, (24, 100))
    for rule in ("floor", "ceil"):
        y, e = ref_mxfp4(x, rule)
        assert_bitwise(F.fake_quant(x, "mxfp4", scale_rule=rule), y)
        np.testing.assert_array_equal(u8(F.quantize(x, "mxfp4", scale_rule=rule).scales), e)
    for fmt, bits_, sym in (
        ("int4", 4, True),
        ("int4-asym", 4, False),
        ("int8", 8, True),
        ("int8-asym", 8, False),
    ):
        for group in (32, -1) if bits_ == 4 else (128,):
            got = F.fake_quant(x, fmt, group_size=group)
            assert_bitwise(got, ref_int(x, bits_, group, sym))
    assert_bitwise(
        F.fake_quant(x, "int4", sign_magnitude=True, group_size=32),
        ref_int(x, 4, 32, True, "serq"),
    )
    got = F.fake_quant(x, "int4-asym", int_rule="fprag", group_size=32)
    assert_bitwise(got, ref_int(x, 4, 32, False, "fprag"))
    # FPRAG does not widen the range to 0 and clamps z to [0, 15]: an all-positive group
    # [0.5, 2] gets scale 0.1 and z = 0, so 2 saturates at 15 * 0.1 = 1.5; GPTQ's widened range
    # [0, 2] represents it exactly.
    pos = np.linspace(0.5, 2, 16, dtype=F32)[None]
    y = np.asarray(F.fake_quant(pos, "int4-asym", int_rule="fprag", group_size=16))
    assert y[0, -1] == 1.5 and y[0, 0] == F32(0.5)
    assert np.asarray(F.fake_quant(pos, "int4-asym", group_size=16))[0, -1] == 2


def test_block_pieces_column_by_column():
    """GPTQ's use: fit a group once, quantize one column at a time with the same d/zero."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((8, 64)).astype(F32)
    params = jax.jit(F.block_params, static_argnums=1)
    qcol = jax.jit(
        lambda x, d, z, spec: F.dequantize_blocks(F.quantize_blocks(x, d, z, spec), d, z, spec),
        static_argnums=3,
    )
    for fmt, kw in (("int4-asym", {"group_size": 32}), ("nvfp4", {}), ("mxfp4", {})):
        spec = F.resolve_format(fmt, **kw)
        g = F.nvfp4_tensor_scale(w) if spec.name == "nvfp4" else None
        b = spec.block
        cols = []
        for start in range(0, 64, b):
            xb = jnp.asarray(w[:, None, start : start + b])  # [N, 1, B]
            scale, d, zero = params(xb, spec, g)
            assert scale.shape == (8, 1) and d.shape == (8, 1, 1)
            assert scale.dtype == spec.scale_dtype
            for j in range(b):
                cols.append(qcol(xb[..., j : j + 1], d, zero, spec)[:, 0, 0])
        assert_bitwise(jnp.stack(cols, 1), F.fake_quant(w, fmt, **kw))


def test_div_is_correctly_rounded():
    """XLA turns x / broadcast(y) into x * (1/y); formats.div must match numpy's f32 division."""
    rng = np.random.default_rng(12)
    a = rng.uniform(0.1, 10, (64, 16)).astype(F32)
    b = rng.uniform(0.1, 10, (64, 1)).astype(F32)
    assert_bitwise(jax.jit(F.div)(a, b), a / b)
    assert_bitwise(jax.jit(lambda v: F.div(v, 7.0))(a), a / F32(7))
    assert_bitwise(jax.jit(jax.vmap(lambda v: F.div(v, 6.0)))(a), a / F32(6))


def test_jit_equals_eager_and_bf16():
    rng = np.random.default_rng(10)
    x = rand_weights(rng, (4, 64))
    cases = (("nvfp4", {}), ("nvfp4-paper", {}), ("mxfp4", {}), ("int4-asym", {"group_size": 32}))
    for fmt, kw in cases:
        jitted = jax.jit(lambda a, fmt=fmt, kw=kw: F.fake_quant(a, fmt, **kw))(x)
        if fmt == "nvfp4":  # op by op, no fusion (slow, so one format only)
            with jax.disable_jit():
                assert_bitwise(F.fake_quant(x, fmt, **kw), jitted)
        spec = F.resolve_format(fmt, **kw)
        static = jax.jit(F.fake_quant, static_argnames=("fmt",))(x, fmt=spec)
        assert_bitwise(static, jitted)
        xb = jnp.asarray(x).astype(jnp.bfloat16)
        yb = F.fake_quant(xb, spec)
        assert yb.dtype == jnp.bfloat16 and yb.shape == x.shape
        assert_bitwise(yb, F.fake_quant(xb.astype(jnp.float32), spec).astype(jnp.bfloat16))
        q = F.quantize(xb, spec)
        assert q.dtype == "bfloat16" and F.dequantize(q).dtype == jnp.bfloat16
        assert_bitwise(F.dequantize(q), yb)
        assert F.dequantize(q, jnp.float32).dtype == jnp.float32


# ------------------------------------------------------------------------------------------
# Specs and errors
# ------------------------------------------------------------------------------------------


def test_resolve_format_and_bits_per_element():
    s = F.resolve_format("int4-asym")
    assert (s.name, s.bits, s.block, s.symmetric) == (
        "int4",
        4,
        128,
        False,
    ) and s.label == "int4-asym"
    assert F.resolve_format("nvfp4") == F.FormatSpec("nvfp4", 4, 16)
    assert hash(F.resolve_format("mxfp4", scale_rule="ceil")) != hash(F.resolve_format("mxfp4"))
    assert F.resolve_format(s, group_size=64).block == 64
    assert F.resolve_format("int8", group_size=-1).block == -1
    table = {
        ("nvfp4", ()): 4.5,
        ("mxfp4", ()): 4.25,
        ("nvfp4-paper", ()): 6.0,
        ("nvfp4-paper", (("tile", (16, 16)),)): 4.125,
        ("int4", ()): 4.25,
        ("int4-asym", ()): 4.3125,
        ("int8", ()): 8.25,
    }
    for (fmt, kw), want in table.items():
        assert F.resolve_format(fmt, **dict(kw)).bits_per_element == want
    assert (
        F.bits_per_element(
            "int4",
        )
        == 4.25
    )
    assert math.isclose(
        F.bits_per_element(F.resolve_format("int4", group_size=-1), k=4096), 4 + 32 / 4096
    )
    with pytest.raises(ValueError, match="axis length"):
        F.resolve_format("int4", group_size=-1).bits_per_element  # noqa: B018
    # Measured: nbytes of an nvfp4 [256, 1024] weight is 4.5 bits/elem + the 4-byte tensor scale.
    q = F.quantize(np.ones((256, 1024), F32), "nvfp4")
    assert q.nbytes == 256 * 1024 * 4.5 / 8 + 4


@pytest.mark.parametrize(
    "fmt,kw,match",
    [
        ("fp8", {}, "known: nvfp4, nvfp4-paper, mxfp4, int4, int8, int4-asym, int8-asym"),
        ("mxfp4", {"tile": (16, 16)}, "tile"),
        ("nvfp4-paper", {"tile": (32, 32)}, "tile"),
        ("int4", {"group_size": 0}, "group size"),
        ("int4", {"group_size": -2}, "group size"),
        ("nvfp4", {"scale_rule": "ceil"}, "scale_rule"),
        ("mxfp4", {"scale_rule": "round"}, "scale_rule"),
        ("nvfp4", {"block": 32}, "blocks of 16"),
        ("int4-asym", {"sign_magnitude": True}, "symmetric"),
        ("nvfp4", {"sign_magnitude": True}, "int formats"),
        ("int4", {"int_variant": "gptq"}, "unknown format options"),
        ("mxfp4", {"symmetric": False}, "int formats"),
        ("int4", {"groupsize": 64}, "unknown format options"),
    ],
)
def test_bad_formats_raise(fmt, kw, match):
    with pytest.raises(ValueError, match=match):
        F.resolve_format(fmt, **kw)
    with pytest.raises(ValueError, match=match):
        F.fake_quant(np.ones((4, 32), F32), fmt, **kw)


@pytest.mark.parametrize(
    "fmt,rule,match",
    [
        ("int4", "fprag", "asymmetric"),
        ("int4", "awq", "int_rule must be one of"),
        ("nvfp4", "gptq", "int formats"),
        ("mxfp4", "fprag", "int formats"),
    ],
)
def test_bad_int_rules_raise(fmt, rule, match):
    """The int scale rule is the quantizer's argument, checked against the format it fits."""
    x = np.ones((4, 32), F32)
    for quant in (F.fake_quant, F.quantize):
        with pytest.raises(ValueError, match=match):
            quant(x, fmt, int_rule=rule)


def test_bad_inputs_raise():
    x = np.ones((4, 32), F32)
    with pytest.raises(ValueError, match="tensor_scale applies to nvfp4"):
        F.quantize(x, "mxfp4", tensor_scale=1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        F.fake_quant(x, "nvfp4", tensor_scale=0.0)
    with pytest.raises(ValueError, match="floating point"):
        F.quantize(np.ones((4, 32), np.int32), "int8")
    with pytest.raises(ValueError, match="2-D"):
        F.quantize(np.ones((2, 4, 32), F32), "nvfp4-paper", tile=(16, 16))
    with pytest.raises(ValueError, match="axis 2 out of range"):
        F.quantize(x, "nvfp4", axis=2)
    with pytest.raises(ValueError, match="empty"):
        F.fake_quant(np.ones((4, 0), F32), "nvfp4")
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN and 0 Inf"):
        F.quantize(x, "nvfp4")
    with pytest.raises(ValueError, match="QTensor"):
        F.dequantize(x)
