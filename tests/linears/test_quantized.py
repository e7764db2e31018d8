"""QuantLinear: the jnp (XLA) path against numpy float64, the Pallas switch, the pytree contract."""

from __future__ import annotations

import _fp4_numpy as npq
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.linears.base import Dense, Linear
from arhq_jax.linears.quantized import FakeQuantLinear, QuantLinear, dequantized, with_kernel
from arhq_jax.numerics import formats


def _factors(rng, n_out, n_in, r, smooth=True, bias=True):
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
    a = (rng.standard_normal((n_in, r)) * 0.05).astype(np.float32) if r else None
    b = (rng.standard_normal((n_out, r)) * 0.05).astype(np.float32) if r else None
    s = np.exp(rng.standard_normal(n_in) * 0.5).astype(np.float32) if smooth else None
    bb = rng.standard_normal(n_out).astype(np.float32) if bias else None
    return w, a, b, s, bb


def _x(rng, shape):
    return (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[-1]))).astype(np.float32)


def _rel(y, y_ref) -> float:
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    return float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))


def _weight64(lin: QuantLinear) -> np.ndarray:
    """float64 weights: decoded by the test's own numpy code for fp4, by formats for the others."""
    w = lin.w
    if w.spec.name in npq.BLOCK:
        codes, scales = np.asarray(w.codes), np.asarray(w.scales)
        return npq.decode_weight(codes, scales, float(w.tensor_scale), w.spec.label, w.shape[1])
    return np.asarray(formats.dequantize(w, jnp.float32), np.float64)


@pytest.mark.parametrize(
    "w_fmt,act_fmt,r,smooth",
    [
        ("nvfp4", "nvfp4", 16, True),
        ("mxfp4", "mxfp4", 8, False),
        ("nvfp4", None, 16, True),
        ("mxfp4", "nvfp4", 0, True),
        ("int4", None, 16, False),
        ("nvfp4-paper", "nvfp4", 4, True),
    ],
)
def test_xla_path_matches_numpy_float64(w_fmt, act_fmt, r, smooth):
    rng = np.random.default_rng(len(w_fmt) + r)
    w, a, b, s, bb = _factors(rng, 72, 200, r, smooth=smooth)
    lin = QuantLinear.from_float(w, a, b, w_fmt, act_fmt, smooth=s, bias=bb)
    x = _x(rng, (2, 5, 200))
    y = jax.jit(lambda lin, x: lin(x))(lin, jnp.asarray(x))
    assert y.shape == (2, 5, 72) and y.dtype == jnp.float32
    # The nvfp4 activation scale is one per call: over all 10 tokens, so quantize them together.
    y64 = npq.lowrank_matmul(x.reshape(10, 200), _weight64(lin), a, b, s, act_fmt, bias=bb)
    assert _rel(y, y64.reshape(2, 5, 72)) <= 1e-5
    # The quantized weights are not the float ones: the check is not vacuous.
    assert _rel(_weight64(lin), w) > 1e-3


def test_static_activation_scale_and_factor_dtype():
    rng = np.random.default_rng(7)
    w, a, b, s, _ = _factors(rng, 40, 96, 16, bias=False)
    lin = QuantLinear.from_float(
        w, a, b, "nvfp4", "nvfp4", smooth=s, factor_dtype=jnp.bfloat16, act_scale=200.0
    )
    assert lin.a.dtype == jnp.bfloat16 and lin.b.dtype == jnp.bfloat16 and lin.rank == 16
    x = _x(rng, (6, 96))
    a16 = np.asarray(lin.a, np.float32)
    b16 = np.asarray(lin.b, np.float32)
    y64 = npq.lowrank_matmul(x, _weight64(lin), a16, b16, s, "nvfp4", tensor_scale=200.0)
    assert _rel(lin(jnp.asarray(x)), y64) <= 1e-5
    # A different static scale gives a different result (the scale is used, not recomputed).
    y_dyn = npq.lowrank_matmul(x, _weight64(lin), a16, b16, s, "nvfp4")
    assert _rel(y_dyn, y64) > 1e-4


def test_bf16_in_bf16_out_and_linear_protocol():
    rng = np.random.default_rng(3)
    w, a, b, s, bb = _factors(rng, 48, 64, 16)
    lin = QuantLinear.from_float(w, a, b, "mxfp4", "mxfp4", smooth=s, bias=bb)
    assert isinstance(lin, Linear) and (lin.in_features, lin.out_features) == (64, 48)
    x = jnp.asarray(_x(rng, (3, 64)), jnp.bfloat16)
    y = lin(x)
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 48)
    y32 = lin(x.astype(jnp.float32))
    assert _rel(y, y32) <= 2.0**-7


def test_with_kernel_switches_every_quant_linear():
    """The model's --kernel switch: every QuantLinear in a pytree, Pallas equal to XLA."""
    rng = np.random.default_rng(11)
    w1, a1, b1, s1, bb1 = _factors(rng, 96, 128, 16)
    w2, _, _, _, _ = _factors(rng, 128, 96, 0, smooth=False, bias=False)
    params = {
        "proj": (
            QuantLinear.from_float(w1, a1, b1, "nvfp4", "nvfp4", smooth=s1, bias=bb1),
            QuantLinear.from_float(w2, None, None, "mxfp4", None),
        ),
        "dense": Dense(jnp.asarray(w2)),
    }
    pk = with_kernel(params, "pallas", interpret=True)
    assert [p.kernel for p in pk["proj"]] == ["pallas", "pallas"]
    assert all(p.interpret for p in pk["proj"]) and isinstance(pk["dense"], Dense)
    assert with_kernel(pk, "xla")["proj"][0].kernel == "xla"

    def forward(p, x):
        h = p["proj"][0](x)
        return p["proj"][1](h) + p["dense"](h)

    x = jnp.asarray(_x(rng, (5, 128)))
    y_x = jax.jit(forward)(params, x)
    y_p = jax.jit(forward)(pk, x)
    assert _rel(y_p, y_x) <= 1e-6


def test_bad_input_raises_value_error():
    rng = np.random.default_rng(0)
    w, a, b, s, bb = _factors(rng, 32, 64, 8)
    lin = QuantLinear.from_float(w, a, b, "nvfp4", "nvfp4", smooth=s, bias=bb)
    with pytest.raises(ValueError, match="shape mismatch"):
        lin(jnp.ones((2, 63)))
    with pytest.raises(ValueError, match="do not match"):
        QuantLinear.from_float(w, a[:10], b, "nvfp4", None)
    with pytest.raises(ValueError, match="rank mismatch"):
        QuantLinear.from_float(w, a, b[:, :4], "nvfp4", None)
    with pytest.raises(ValueError, match="smooth must have shape"):
        QuantLinear.from_float(w, None, None, "nvfp4", None, smooth=s[:5])
    with pytest.raises(ValueError, match="positive and finite"):
        QuantLinear.from_float(w, None, None, "nvfp4", None, smooth=np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        QuantLinear.from_float(w, None, None, "nvfp4", None, bias=bb[:3])
    with pytest.raises(ValueError, match="unknown format"):
        QuantLinear.from_float(w, None, None, "fp3", None)
    with pytest.raises(ValueError, match="act_scale applies to nvfp4"):
        QuantLinear.from_float(w, None, None, "mxfp4", "mxfp4", act_scale=0.1)
    with pytest.raises(ValueError, match="unknown kernel"):
        with_kernel({"l": lin}, "cuda")
    int4 = QuantLinear.from_float(w, None, None, "int4", None)
    with pytest.raises(ValueError, match="not supported by the Pallas kernel"):
        with_kernel({"l": int4}, "pallas", interpret=True)
    with pytest.raises(ValueError, match="not supported by the Pallas kernel"):
        QuantLinear.from_float(w, None, None, "nvfp4", "int8", kernel="pallas")
    with pytest.raises(ValueError, match="cannot quantize non-finite"):
        QuantLinear.from_float(np.full((4, 16), np.nan, np.float32), None, None, "nvfp4", None)


def test_dequantized_form_equals_packed_bitwise():
    """FakeQuantLinear (f32 residual) gives the packed QuantLinear's output bit for bit."""
    k = jax.random.split(jax.random.key(7), 5)
    w = jax.random.normal(k[0], (40, 96))
    a, b = jax.random.normal(k[1], (96, 8)), jax.random.normal(k[2], (40, 8))
    s = jnp.exp(jax.random.normal(k[3], (96,)) * 0.3)
    ql = QuantLinear.from_float(w, a, b, "nvfp4", "nvfp4", smooth=s)
    tree = {"p": ql, "other": Dense(w)}
    fq = dequantized(tree)
    assert isinstance(fq["p"], FakeQuantLinear) and isinstance(fq["other"], Dense)
    assert fq["p"].w.dtype == jnp.float32 and fq["p"].w.shape == (40, 96)
    x = jax.random.normal(k[4], (3, 5, 96))
    np.testing.assert_array_equal(np.asarray(fq["p"](x)), np.asarray(ql(x)))
