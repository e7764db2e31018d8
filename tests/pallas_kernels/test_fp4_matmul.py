"""Pallas FP4 kernels (docs/spec/kernels.md §9): CPU interpret mode against the jnp path, bit-exact
activation quantization, an independent float64 check, the Triton lowering, and bad input."""

from __future__ import annotations

import contextlib
import functools
import re

import _fp4_numpy as npq
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels.codecs as codecs
from arhq_jax.linears.quantized import quant_matmul_ref, smooth_input
from arhq_jax.numerics import formats
from pallas_kernels.fp4_matmul import (
    choose_split,
    choose_tiles,
    fp4_lowrank_matmul,
    matmul_impl,
    quantize_activations,
)

ON_GPU = jax.default_backend() == "gpu"


def _bytes(a) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))


def make_case(m, n, k, r, w_fmt, *, smooth=False, bias=False, dtype=jnp.float32, seed=0):
    """Activations with per-channel outliers, a quantized residual, bf16 factors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.exp(rng.standard_normal(k))
    w = formats.quantize(jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32), w_fmt)
    a = b = s = bb = None
    if r:
        a = jnp.asarray(rng.standard_normal((k, r)) * 0.05, jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((n, r)) * 0.05, jnp.bfloat16)
    if smooth:
        s = jnp.asarray(np.exp(rng.standard_normal(k) * 0.5), jnp.float32)
    if bias:
        bb = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return jnp.asarray(x, dtype), w, a, b, s, bb


def rel_err(y, y_ref) -> float:
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    return float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))


# ---------------------------------------------------------------------------------------------
# In-register codecs against ml_dtypes (exhaustive where the domain is small), under jit
# ---------------------------------------------------------------------------------------------


def test_codecs_match_ml_dtypes():
    rng = np.random.default_rng(0)
    b = np.arange(127, dtype=np.int32)  # non-negative, non-NaN e4m3 bytes
    e4 = b.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e4m3_value)(b)), e4)
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e4m3_byte)(e4)), b)
    v = np.concatenate(
        [rng.uniform(0, 448, 20000), np.exp(rng.uniform(-25, 6, 20000)), (e4[1:] + e4[:-1]) / 2]
    )
    v = np.clip(v, 0, 448).astype(np.float32)
    want = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e4m3_round)(v)), want)

    codes = np.arange(16, dtype=np.int32)
    got = np.asarray(jax.jit(codecs.e2m1_value)(codes))
    np.testing.assert_array_equal(got, npq.E2M1)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(npq.E2M1))
    mids = (npq.E2M1[1:8] + npq.E2M1[:7]) / 2
    x = np.concatenate([rng.uniform(-6, 6, 20000), mids, -mids, [0.0, -0.0, 6, -6]])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e2m1_code)(x)), npq.e2m1_codes(x))
    # The value-only rounding of kernel 1's bf16 operand: the values of the ml_dtypes codes.
    near = np.concatenate([np.nextafter(mids, 0), np.nextafter(mids, 7)]).astype(np.float32)
    x2 = np.concatenate([x, near, -near])
    want_v = npq.E2M1[npq.e2m1_codes(x2)]
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e2m1_round)(x2)), want_v)

    e = np.arange(255, dtype=np.int32)
    e8 = e.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e8m0_value)(e)), e8)
    a = np.concatenate([np.exp(rng.uniform(-90, 80, 5000)), [0.0, 4.0, 7.99, 8.0]]).astype(
        np.float32
    )
    _, ex = np.frexp(a)
    want_b = np.where(a > 0, np.clip(ex - 3, -127, 127), -127) + 127
    np.testing.assert_array_equal(np.asarray(jax.jit(codecs.e8m0_floor_byte)(a)), want_b)


# ---------------------------------------------------------------------------------------------
# Kernel 1: packed activations bit for bit
# ---------------------------------------------------------------------------------------------

N1 = [10.5, -7, 5.25, 3.5, 2.625, 1.75, -1.3125, 0.4375, 0, -0.875, 4.375, -10.5, 6.125,
      0.21875, -2.1875, 8.75]  # fmt: skip
N2 = [1, -0.5, 0.25, 0.1, 0.171875, -0.34375, 0.6, 0, -1, 0.75, 0.03, 0.9, -0.2578125, 0.5, 0.4,
      -0.0859375]  # fmt: skip
N3 = [0.859375, 0.5, -0.3, 0.2, 0.1, 0.05, -0.6, 0.7] + [0] * 7 + [-0.859375]
N4 = [2688, -1344] + [0] * 14 + [0.01, -0.004] + [0] * 14 + [0.0005, 0.0001] + [0] * 14
M1 = [7.5, 6.9, -6.5, 0.25, 0.75, 2.5, 3.5, 5, -0.3, 1.25] + [0] * 22
M2 = [0.1, -0.05, 0.03] + [0] * 29


def test_e2m1_pair_f16_and_bf16_parts():
    """The GEMM's weight decode (every byte, both nibbles) against ml_dtypes, and the W4A16 operand
    split: three bf16 parts that sum to the f32 value exactly."""
    b = np.arange(256, dtype=np.uint8)
    lo, hi = jax.jit(codecs.e2m1_pair_f16)(b)
    f4 = lambda n: n.view(ml_dtypes.float4_e2m1fn).astype(np.float64)  # noqa: E731
    want_lo = f4((b & 15).astype(np.uint8))
    want_hi = f4((b >> 4).astype(np.uint8))
    got_lo = np.asarray(lo, np.float64) * codecs.F16_FOLD
    got_hi = np.asarray(hi, np.float64) * codecs.F16_FOLD
    np.testing.assert_array_equal(got_lo, want_lo)
    np.testing.assert_array_equal(got_hi, want_hi)
    np.testing.assert_array_equal(np.signbit(np.asarray(lo)), np.signbit(want_lo))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp(rng.standard_normal(4096) * 4)).astype(np.float32)
    parts = jax.jit(lambda v: codecs.bf16_parts(v, 3))(x)
    total = sum(np.asarray(p, np.float64) for p in parts)
    np.testing.assert_array_equal(total, x.astype(np.float64))
    assert all(p.dtype == jnp.bfloat16 for p in parts)


@pytest.mark.parametrize("act,form", [("nvfp4", "bf16"), ("mxfp4", "bf16"), (None, "parts3")])
def test_kernel1_split_k_equals_row_programs(act, form):
    """Kernel 1 parallel over K (t as per-slab partial sums) equals the row-owning grid."""
    from pallas_kernels.act_quant import act_prepare_call

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((40, 256)) * np.exp(rng.standard_normal(256)), jnp.float32)
    s = jnp.asarray(np.exp(rng.standard_normal((1, 256)) * 0.5), jnp.float32)
    a = jnp.asarray(rng.standard_normal((256, 16)) * 0.05, jnp.bfloat16)
    g = None if act != "nvfp4" else jnp.full((1, 1), 50.0, jnp.float32)
    run = functools.partial(
        act_prepare_call, x, s, a, g, act=act, form=form, bm=16, bk=64, interpret=True
    )
    split, rows = run(split=True), run(split=False)
    assert split["t"].shape == (4, 48, 16) and rows["t"].shape == (1, 48, 16)
    key = "xp" if form.startswith("parts") else "xa"
    np.testing.assert_array_equal(np.asarray(split[key])[..., :40, :], rows[key][..., :40, :])
    t_split = np.asarray(split["t"]).sum(0)[:40]
    assert rel_err(t_split, np.asarray(rows["t"][0])[:40]) <= 1e-6
    xs = np.asarray(x, np.float64) * (1.0 / np.asarray(s, np.float64))
    t64 = xs @ np.asarray(a.astype(jnp.float32), np.float64)
    assert rel_err(t_split, t64) <= 1e-6


def test_kernel1_golden_vectors():
    """docs/spec/formats.md §10: N1-N4 (nvfp4-modelopt) and M1-M3 (mxfp4) codes, packed bytes and
    scale
    bytes; the compressed-tensors convention on the same vectors."""
    q = functools.partial(quantize_activations, interpret=True)
    codes, scales, g = q(jnp.asarray([N1 + N2 + N3], jnp.float32), "nvfp4-modelopt")
    assert float(g) == 2.0**-8
    assert _bytes(scales).tolist() == [[0x7E, 0x63, 0x61]]
    assert np.asarray(codes)[0, :8].tolist() == [0xE7, 0x45, 0x23, 0x0A, 0x90, 0xF4, 0x06, 0x6A]
    nib = np.stack([np.asarray(codes) & 15, np.asarray(codes) >> 4], -1).reshape(-1)
    assert nib[16:32].tolist() == [7, 0xD, 3, 1, 2, 0xC, 5, 0, 0xF, 6, 0, 7, 0xB, 5, 4, 9]
    assert nib[32:48].tolist() == [7, 6, 0xC, 3, 1, 1, 0xE, 6, 0, 0, 0, 0, 0, 0, 0, 0xF]
    codes, scales, g = q(jnp.asarray([N4], jnp.float32), "nvfp4-modelopt")
    assert float(g) == 1.0 and _bytes(scales).tolist() == [[0x7E, 0x01, 0x00]]
    nib = np.stack([np.asarray(codes) & 15, np.asarray(codes) >> 4], -1).reshape(-1)
    assert nib[[0, 1, 16, 17, 32, 33]].tolist() == [7, 0xD, 7, 0xC, 0, 0]
    # compressed-tensors convention: gs = 256 makes N1-N3 identical; N4's flushed block stores
    # the placeholder 0.125 (0x20), and a negative value rounding to zero there encodes as 0x8.
    codes_ct, scales_ct, g = q(jnp.asarray([N1 + N2 + N3], jnp.float32), "nvfp4")
    assert float(g) == 256.0 and _bytes(scales_ct).tolist() == [[0x7E, 0x63, 0x61]]
    x4 = np.array([N4], np.float32)
    x4[0, 34] = -1e-4
    codes_ct, scales_ct, g = q(jnp.asarray(x4), "nvfp4")
    assert float(g) == (np.float32(1) / np.float32(2688)) * np.float32(2688)
    assert _bytes(scales_ct).tolist() == [[0x7E, 0x01, 0x20]]
    nib = np.stack([np.asarray(codes_ct) & 15, np.asarray(codes_ct) >> 4], -1).reshape(-1)
    assert nib[[0, 1, 16, 17, 32, 33, 34, 35]].tolist() == [7, 0xD, 7, 0xC, 0, 0, 8, 0]
    codes, scales, _ = q(jnp.asarray([M1, M2, [0.0] * 32], jnp.float32), "mxfp4")
    assert _bytes(scales)[:, 0].tolist() == [0x7F, 0x79, 0x00]
    nib = np.stack([np.asarray(codes) & 15, np.asarray(codes) >> 4], -1).reshape(3, -1)
    assert npq.E2M1[nib[0, :10]].tolist() == [6, 6, -6, 0, 1, 2, 4, 4, -0.5, 1]
    assert npq.E2M1[nib[1, :3]].tolist() == [6, -3, 2] and not nib[2].any()


@pytest.mark.parametrize(
    "fmt,smooth,k,static_g",
    [("nvfp4", False, 200, False), ("nvfp4", True, 320, False), ("nvfp4", True, 200, True),
     ("nvfp4-modelopt", True, 320, False), ("nvfp4-modelopt", True, 200, True),
     ("mxfp4", False, 200, False), ("mxfp4", True, 448, False)],
)  # fmt: skip
def test_kernel1_packed_equals_formats_quantize(fmt, smooth, k, static_g):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((33, k)) * np.exp(2 * rng.standard_normal((33, 1)))
    grid = np.round(rng.standard_normal((16, k)) * 8) / 8  # many exact E2M1 ties
    tiny = rng.standard_normal((4, k)) * 1e-3  # negative values rounding to zero, -0.0, zeros
    tiny[:, ::5] = -0.0
    tiny[0, :32] = 0.0
    x = jnp.asarray(np.concatenate([x, grid, tiny]), jnp.float32)
    s = jnp.asarray(np.exp(rng.standard_normal(k) * 0.3), jnp.float32) if smooth else None
    ts = None if not static_g else (100.0 if fmt == "nvfp4" else 0.01)
    f = jax.jit(
        functools.partial(quantize_activations, act_fmt=fmt, tensor_scale=ts, interpret=True)
    )
    codes, scales, g = f(x, smooth=s)
    want = formats.quantize(smooth_input(x, s), fmt, tensor_scale=ts)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want.codes))
    np.testing.assert_array_equal(_bytes(scales), _bytes(want.scales))
    assert float(g) == float(want.tensor_scale)


# ---------------------------------------------------------------------------------------------
# The fused GEMM against the jnp path (<= 1e-6 relative in f32), under jit
# ---------------------------------------------------------------------------------------------

CASES = [
    # m, n, k, r, w_fmt, act_fmt, smooth, bias, dtype, tiles (bm, bn, bk) or None
    (1, 200, 320, 16, "nvfp4", "nvfp4", True, False, "float32", None),
    (1, 96, 200, 0, "mxfp4", None, False, True, "float32", None),
    (7, 200, 320, 64, "mxfp4", "mxfp4", False, True, "float32", None),
    (7, 144, 200, 16, "nvfp4", None, True, False, "float32", None),
    (7, 96, 200, 16, "mxfp4", "nvfp4", True, False, "float32", None),
    (7, 112, 176, 0, "nvfp4", "mxfp4", False, False, "float32", None),
    (128, 144, 448, 64, "mxfp4", "mxfp4", True, False, "float32", (32, 64, 64)),
    (128, 160, 320, 16, "nvfp4", "nvfp4", False, True, "float32", (64, 32, 64)),
    (128, 96, 200, 0, "nvfp4", None, False, False, "float32", (128, 32, 128)),
    (128, 80, 224, 64, "mxfp4", None, True, True, "float32", (64, 64, 32)),
    (7, 200, 320, 16, "nvfp4", "nvfp4", True, True, "bfloat16", None),
    (128, 96, 200, 64, "mxfp4", None, False, False, "bfloat16", (64, 32, 64)),
    (7, 200, 320, 16, "nvfp4-modelopt", "nvfp4-modelopt", True, True, "float32", None),
    (128, 160, 320, 16, "nvfp4-modelopt", "nvfp4", False, False, "float32", (64, 32, 64)),
    # 6 programs over 16 K tiles: split-K by 4 (choose_split)
    (1, 96, 1024, 16, "mxfp4", "mxfp4", True, True, "float32", (16, 16, 64)),
    # served layout: bf16 x without smoothing (kernel 1's t from one bf16 part)
    (16, 96, 256, 32, "nvfp4", "nvfp4", False, False, "bfloat16", None),
    (16, 96, 256, 32, "nvfp4", None, False, False, "bfloat16", None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_matmul_matches_jnp_path(case):
    m, n, k, r, wf, af, sm, bias, dt, tiles = case
    x, w, a, b, s, bb = make_case(m, n, k, r, wf, smooth=sm, bias=bias, dtype=jnp.dtype(dt))
    kw = {} if tiles is None else dict(zip(("block_m", "block_n", "block_k"), tiles, strict=True))
    f = jax.jit(functools.partial(fp4_lowrank_matmul, act_fmt=af, interpret=True, **kw))
    y = f(x, w, a, b, s, bias=bb)
    y_ref = quant_matmul_ref(x, w, a, b, s, af, bias=bb)
    assert y.shape == (m, n) and y.dtype == x.dtype
    if dt == "float32":
        assert rel_err(y, y_ref) <= 1e-6
    else:  # both round the same f32 value (to ~1e-7) to bf16: at most one bf16 ulp apart
        y64, r64 = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
        assert np.all(np.abs(y64 - r64) <= 2.0**-7 * np.abs(r64) + 1e-6 * np.abs(r64).max())
    assert np.abs(np.asarray(y_ref, np.float32)).max() > 0.1  # a non-trivial output


def test_matmul_batched_static_scale_and_fast_a16():
    """Leading batch axes, a static nvfp4 activation scale, and the bf16-activation W4A16 mode."""
    x, w, a, b, s, _ = make_case(12, 96, 200, 16, "nvfp4", smooth=True, seed=3)
    x3 = x.reshape(3, 4, 200)
    y = fp4_lowrank_matmul(x3, w, a, b, s, "nvfp4", act_tensor_scale=50.0, interpret=True)
    y_ref = quant_matmul_ref(x3, w, a, b, s, "nvfp4", act_tensor_scale=50.0)
    assert y.shape == (3, 4, 96) and rel_err(y, y_ref) <= 1e-6
    y = fp4_lowrank_matmul(x, w, a, b, s, None, a16_bf16=True, interpret=True)
    y_ref = quant_matmul_ref(x, w, a, b, s, None, a16_bf16=True)
    assert rel_err(y, y_ref) <= 1e-6
    # The fast mode really differs from the exact one (x/s is not exact in bf16).
    assert rel_err(y, quant_matmul_ref(x, w, a, b, s, None)) > 1e-5


@pytest.mark.parametrize("wf,af", [("nvfp4", "nvfp4"), ("mxfp4", "mxfp4"), ("nvfp4", None)])
def test_matmul_matches_numpy_float64(wf, af):
    """Kernel vs a numpy/ml_dtypes quantizer and decoder written in the tests (about 1e-5)."""
    x, w, a, b, s, bb = make_case(7, 144, 320, 16, wf, smooth=True, bias=True, seed=5)
    y = fp4_lowrank_matmul(x, w, a, b, s, af, bias=bb, interpret=True)
    w64 = npq.decode_weight(
        np.asarray(w.codes), np.asarray(w.scales), float(w.tensor_scale), wf, 320
    )
    y64 = npq.lowrank_matmul(np.asarray(x), w64, a, b, s, af, bias=bb)
    assert rel_err(y, y64) <= 1e-5


# ---------------------------------------------------------------------------------------------
# The Triton lowering (on CPU: lowered for CUDA through jax.export, not compiled or run)
# ---------------------------------------------------------------------------------------------


def _triton_ir_strings(text: str) -> dict[str, set[bytes]]:
    """Printable strings of each Triton kernel's serialized IR (MLIR bytecode) in an export."""
    out = {}
    for blob, name in re.findall(r'ir = "(.*?)", name = "(\w+)"', text, flags=re.S):
        raw = re.sub(
            rb"\\([0-9A-Fa-f]{2}|\\|\")",
            lambda m: bytes([int(m[1], 16)]) if len(m[1]) == 2 else m[1],
            blob.encode("latin-1"),
        )
        out[name] = set(re.findall(rb"[ -~]{4,}", raw))
    return out


def gpu_lowering_context():
    """jax >= 0.11 lowers for CUDA without a GPU only under an abstract GPU device ("No supported
    GPU devices found, please specify an abstract GPU device using AbstractDevice");
    0.10.2 needs none (docs/spec/kernels.md §7)."""
    if jax.__version_info__ < (0, 11):
        return contextlib.nullcontext()
    from jax.sharding import AbstractDevice, AbstractMesh

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev))


@pytest.mark.parametrize(
    "m,af,r", [(1, "nvfp4", 32), (256, "mxfp4", 16), (16, None, 0), (1, "nvfp4-modelopt", 0)]
)
def test_kernels_lower_to_triton(m, af, r):
    from jax import export

    x, w, a, b, s, bb = make_case(
        m, 256, 512, r, "nvfp4", smooth=True, bias=True, dtype=jnp.bfloat16
    )
    bm, bn, bk, nw, ns = choose_tiles(m, 256, 512)
    split = 2 if m == 1 else 1  # split-K: the f32 partials of two K slices
    f = functools.partial(
        matmul_impl,
        act=af,
        tiles=(bm, bn, bk),
        warps=(nw, ns),
        a16_bf16=False,
        interpret=False,
        split=split,
    )
    check = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with gpu_lowering_context():
        exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[check])(
            x, w, a, b, s, bb, None
        )
    text = exp.mlir_module()
    assert "arhq_fp4_lowrank_gemm" in text
    assert "arhq_act_prepare" in text  # t = (x/s)·A and the activation operand, at any M
    # The weight decode is the packed-word PTX (four code bytes per register, pack=4) that also
    # multiplies by the block scale (bf16x2): nvfp4 weights here.
    ir2 = _triton_ir_strings(text)["arhq_fp4_lowrank_gemm"]
    assert b"mul.rn.bf16x2 $0, t, $3;" in ir2
    if af is not None and af.startswith("nvfp4"):
        # Every division of the nvfp4 quantizer is PTX div.rn.f32 (Triton's own f32 division,
        # arith.divf -> div.full.f32, is approximate and would move scales and ties).
        ir = _triton_ir_strings(text)["arhq_act_prepare"]
        assert b"div.rn.f32 $0, $1, $2;" in ir and b"divf" not in ir


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error():
    x, w, a, b, s, _ = make_case(4, 96, 200, 16, "nvfp4", smooth=True)
    run = functools.partial(fp4_lowrank_matmul, interpret=True)
    with pytest.raises(ValueError, match="shape mismatch"):
        run(x[:, :100], w)
    with pytest.raises(ValueError, match="low-rank factor shapes"):
        run(x, w, a[:100], b)
    with pytest.raises(ValueError, match="both low-rank factors"):
        run(x, w, a, None)
    with pytest.raises(ValueError, match="smooth must have shape"):
        run(x, w, smooth=s[:10])
    w_int = formats.quantize(jnp.ones((96, 200)), "int4")
    with pytest.raises(ValueError, match="'int4' is not supported by the Pallas kernel"):
        run(x, w_int)
    with pytest.raises(ValueError, match="'nvfp4-paper' is not supported"):
        run(x, w, act_fmt="nvfp4-paper")
    with pytest.raises(ValueError, match="floor rule"):
        run(x, w, act_fmt=formats.resolve_format("mxfp4", scale_rule="ceil"))
    with pytest.raises(ValueError, match="unknown format"):
        run(x, w, act_fmt="fp5")
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        run(x, w, block_k=48)
    with pytest.raises(ValueError, match="QTensor"):
        run(x, jnp.ones((96, 200)))
    if not ON_GPU:
        with pytest.raises(ValueError, match="interpret=True"):
            fp4_lowrank_matmul(x, w)


# ---------------------------------------------------------------------------------------------
# GPU: the same cases compiled by Triton (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_gpu_matmul_matches_jnp_path(case):
    m, n, k, r, wf, af, sm, bias, dt, tiles = case
    x, w, a, b, s, bb = make_case(m, n, k, r, wf, smooth=sm, bias=bias, dtype=jnp.dtype(dt))
    kw = {} if tiles is None else dict(zip(("block_m", "block_n", "block_k"), tiles, strict=True))
    y = jax.jit(functools.partial(fp4_lowrank_matmul, act_fmt=af, **kw))(x, w, a, b, s, bias=bb)
    y_ref = quant_matmul_ref(x, w, a, b, s, af, bias=bb)
    assert rel_err(y, y_ref) <= (1e-6 if dt == "float32" else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-modelopt", "mxfp4"])
def test_gpu_kernel1_packed_equals_formats_quantize(fmt):
    """On the GPU the in-kernel divisions must be correctly rounded (div.rn.f32) for this to hold
    at exact ties (the grid rows) and for the block scales."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 512)) * np.exp(rng.standard_normal(512))
    grid = np.round(rng.standard_normal((64, 512)) * 8) / 8
    x = jnp.asarray(np.concatenate([x, grid, x * 1e-3]), jnp.float32)
    codes, scales, _ = quantize_activations(x, fmt)
    want = formats.quantize(x, fmt)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want.codes))
    np.testing.assert_array_equal(_bytes(scales), _bytes(want.scales))


def _run_ptx(asm: str, q: int, outs: int, extra: tuple[int, ...] = ()) -> list[int]:
    """A tiny interpreter of the b32 instructions the packed decode uses (prmt, and, shr, shl,
    lop3, mul.rn.bf16x2), written from the PTX ISA: runs ``asm`` on the input registers
    q, *extra ($outs, $outs+1, ...), returns $0..$outs-1."""
    regs = {f"${outs + i}": v for i, v in enumerate((q, *extra))}
    m32 = 0xFFFFFFFF

    def val(tok: str) -> int:
        return regs[tok] if tok in regs else int(tok.rstrip("U"), 0) & m32

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *a = [t.strip() for t in rest.split(",")]
        v = [val(t) for t in a]
        if op == "prmt.b32":  # bytes of {b, a}: 0-3 from a, 4-7 from b; selector nibble i
            src = v[0] | (v[1] << 32)
            r = 0
            for i in range(4):
                sel = (v[2] >> (4 * i)) & 7
                r |= ((src >> (8 * sel)) & 0xFF) << (8 * i)
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = (v[0] << v[1]) & m32
        elif op == "lop3.b32":  # bit i of the result: LUT[(a_i << 2) | (b_i << 1) | c_i]
            r = 0
            for i in range(32):
                idx = (((v[0] >> i) & 1) << 2) | (((v[1] >> i) & 1) << 1) | ((v[2] >> i) & 1)
                r |= ((v[3] >> idx) & 1) << i
        elif op == "mul.rn.bf16x2":  # per 16-bit half, bf16 with subnormals, round to even
            halves = np.array([v[0], v[1]], np.uint32)
            bf = ml_dtypes.bfloat16
            lo = (halves & 0xFFFF).astype(np.uint16).view(bf).astype(np.float64)
            hi = (halves >> 16).astype(np.uint16).view(bf).astype(np.float64)
            # the f64 product of two bf16 values is exact; one rounding to bf16
            with np.errstate(over="ignore"):  # inf where the product overflows, as PTX
                p = np.array([lo[0] * lo[1], hi[0] * hi[1]]).astype(bf).view(np.uint16)
            r = int(p[0]) | (int(p[1]) << 16)
        else:
            raise AssertionError(f"instruction not modelled: {op}")
        regs[d] = r
    return [regs[f"${i}"] for i in range(outs)]


def test_nvfp4_bf16_scaled_decode_is_exact():
    """The nvfp4 weight operand: every (byte, scale byte) pair decodes to bf16 E2M1 · S · 2^-7
    exactly (against ml_dtypes), and the scaled inline PTX, run by the interpreter (bf16
    subnormals kept, as PTX does) over random words and scales, gives the same bits."""
    sb = np.arange(127, dtype=np.int32)  # non-negative, non-NaN e4m3 bytes
    e4 = sb.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    pre = np.asarray(jax.jit(codecs.e4m3_bf16_prescaled)(sb))
    np.testing.assert_array_equal(pre.astype(np.float64), e4 * 2.0**119)
    b = np.arange(256, dtype=np.uint8)
    lo, hi = jax.jit(codecs.e2m1_pair_bf16_scaled, static_argnames="interpret")(
        np.repeat(b[:, None], 127, 1), np.repeat(pre[None, :], 256, 0), interpret=True
    )
    f4 = lambda n: n.view(ml_dtypes.float4_e2m1fn).astype(np.float64)  # noqa: E731
    want_lo = f4((b & 15).astype(np.uint8))[:, None] * e4[None, :] / codecs.BF16_FOLD
    want_hi = f4((b >> 4).astype(np.uint8))[:, None] * e4[None, :] / codecs.BF16_FOLD
    np.testing.assert_array_equal(np.asarray(lo, np.float64), want_lo)
    np.testing.assert_array_equal(np.asarray(hi, np.float64), want_hi)
    np.testing.assert_array_equal(np.signbit(np.asarray(lo, np.float64)[:, 0]), (b & 8) > 0)
    rng = np.random.default_rng(4)
    lo16, hi16 = np.asarray(lo).view(np.uint16), np.asarray(hi).view(np.uint16)
    words = [rng.integers(0, 256, 4) for _ in range(300)] + [np.full(4, v) for v in range(256)]
    for bs in words:
        si = rng.integers(0, 127, 4)
        sv = pre[si].view(np.uint16).astype(np.int64)
        q = int(bs[0]) | int(bs[1]) << 8 | int(bs[2]) << 16 | int(bs[3]) << 24
        extra = (int(sv[0] | sv[1] << 16), int(sv[2] | sv[3] << 16))
        for asm, ref in ((codecs.E2M1_LO_SCALED_PTX, lo16), (codecs.E2M1_HI_SCALED_PTX, hi16)):
            r01, r23 = _run_ptx(asm, q, 2, extra)
            got = [r01 & 0xFFFF, r01 >> 16, r23 & 0xFFFF, r23 >> 16]
            assert got == [int(ref[bb, i]) for bb, i in zip(bs, si, strict=True)]


def test_mxfp4_bf16_scaled_decode_is_exact():
    """The mxfp4 weight operand: every byte at every E8M0 scale b in [2, 254] decodes to bf16
    E2M1 × 2^(b - 127) (against ml_dtypes; inf where the value itself overflows), and the two-
    multiplier inline PTX, run by the interpreter, gives the same bits."""
    sb = np.arange(2, 255, dtype=np.int32)
    m1, m2 = jax.jit(codecs.e8m0_bf16_factors)(sb)
    np.testing.assert_array_equal(
        np.asarray(m1, np.float64) * np.asarray(m2, np.float64) * 2.0**-126, 2.0 ** (sb - 127.0)
    )
    b = np.arange(256, dtype=np.uint8)
    rep = lambda v: np.repeat(np.asarray(v)[None, :], 256, 0)  # noqa: E731
    lo, hi = jax.jit(codecs.e2m1_pair_bf16_scaled, static_argnames="interpret")(
        np.repeat(b[:, None], sb.size, 1), rep(m1), scale2=rep(m2), interpret=True
    )
    f4 = lambda n: n.view(ml_dtypes.float4_e2m1fn).astype(np.float64)  # noqa: E731
    with np.errstate(over="ignore"):
        for got, nib in ((lo, b & 15), (hi, b >> 4)):
            want = f4(nib.astype(np.uint8))[:, None] * 2.0 ** (sb[None, :] - 127.0)
            want = want.astype(ml_dtypes.bfloat16).astype(np.float64)  # inf where it overflows
            np.testing.assert_array_equal(np.asarray(got, np.float64), want)
    rng = np.random.default_rng(5)
    lo16, hi16 = np.asarray(lo).view(np.uint16), np.asarray(hi).view(np.uint16)
    f1, f2 = np.asarray(m1).view(np.uint16), np.asarray(m2).view(np.uint16)
    for _ in range(400):
        bs, si = rng.integers(0, 256, 4), rng.integers(0, sb.size, 4)
        q = int(bs[0]) | int(bs[1]) << 8 | int(bs[2]) << 16 | int(bs[3]) << 24
        pair = lambda v: (int(v[0]) | int(v[1]) << 16, int(v[2]) | int(v[3]) << 16)  # noqa: E731
        (a0, a1), (c0, c1) = pair(f1[si]), pair(f2[si])
        for asm, ref in ((codecs.E2M1_LO_SCALED2_PTX, lo16), (codecs.E2M1_HI_SCALED2_PTX, hi16)):
            r01, r23 = _run_ptx(asm, q, 2, (a0, a1, c0, c1))
            got = [r01 & 0xFFFF, r01 >> 16, r23 & 0xFFFF, r23 >> 16]
            assert got == [int(ref[bb, i]) for bb, i in zip(bs, si, strict=True)]


@pytest.mark.parametrize(
    "m,wf,af,split", [(1, "mxfp4", "mxfp4", 4), (7, "nvfp4", None, 2), (128, "nvfp4", "nvfp4", 8)]
)
def test_split_k_matches_jnp_path(m, wf, af, split):
    """Kernel 2 with split-K (f32 partials over K slices, the low-rank term and bias in slice 0,
    summed after): the jnp path at 1e-6, and the same as no split up to summation order."""
    x, w, a, b, s, bb = make_case(m, 96, 1024, 16, wf, smooth=True, bias=True, seed=11)
    run = functools.partial(fp4_lowrank_matmul, act_fmt=af, bias=bb, interpret=True)
    y = run(x, w, a, b, s, block_k=64, split_k=split)
    y_ref = quant_matmul_ref(x, w, a, b, s, af, bias=bb)
    assert y.shape == (m, 96) and y.dtype == x.dtype
    assert rel_err(y, y_ref) <= 1e-6
    assert rel_err(y, run(x, w, a, b, s, block_k=64, split_k=1)) <= 1e-6
    with pytest.raises(ValueError, match="split_k must be a power of two dividing the 16 K tiles"):
        run(x, w, a, b, s, block_k=64, split_k=3)


def test_choose_split_fills_the_sms_only_when_the_grid_does_not():
    assert choose_split(1, 256, 32) == 1  # q/o decode, 16-wide tiles: 256 programs already
    assert choose_split(1, 64, 32) == 4  # k/v decode: 64 programs -> 256
    assert choose_split(1, 8, 32) == 8  # k/v at M = 128: at least 4 K tiles per slice
    assert choose_split(1, 8, 8) == 2 and choose_split(1, 8, 6) == 1
    assert choose_split(1, 112, 32) == 1  # gate/up at M = 128: over half the SMs busy already
    assert choose_split(16, 8, 32) == 1  # k/v at M = 2048: 128 programs
