"""SERQ (docs/spec/methods.md §7): flattening, permutation, compensation, runtime and effective
bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.linears.base import Linear
from arhq_jax.methods import serq
from arhq_jax.methods.gptq import gptq_quantize
from arhq_jax.numerics import formats as F

OUT, K, R = 48, 256, 128


def _layer(seed=0, n=300, k=K):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((OUT, k)) * 0.05).astype(np.float32)
    ch = rng.uniform(0.2, 1.5, k)
    ch[rng.choice(k, 6, replace=False)] = 30.0  # activation outliers
    x = (rng.standard_normal((n, k)) * ch).astype(np.float32)
    return w, x


def np_serq_act(x, bits=4, g=128):
    """numpy port of SERQ's AsymPerGroupQuant (in % g == 0), in f32 arithmetic like the code."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(x.shape[0], -1, g)
    hi, lo = xb.max(-1, keepdims=True), xb.min(-1, keepdims=True)
    both = (hi == 0) & (lo == 0)
    hi, lo = np.where(both, 1.0, hi), np.where(both, -1.0, lo)
    sc = (hi - lo) / np.float32(2**bits - 1)
    z = np.rint(-lo / sc)
    q = np.clip(np.rint(xb / sc) + z, 0, 2**bits - 1)
    return ((q - z) * sc).reshape(x.shape)


def test_permutation_and_flattening_preserve_the_unquantized_output():
    w, x = _layer(0)
    s = serq.serq_flatten_scale(x.min(0), x.max(0))
    perm = np.asarray(serq.serq_order(s))
    np.testing.assert_array_equal(np.sort(perm), np.arange(K))  # a bijection
    sv = np.asarray(s)
    assert np.all(np.diff(sv[perm]) <= 0)  # most salient first
    np.testing.assert_allclose(sv, np.abs(x).max(0), rtol=1e-7)
    xt = np.asarray(serq.serq_input(x, s, perm), np.float64)
    wt = np.asarray(serq.serq_transform(w, s, perm), np.float64)
    y = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(xt @ wt.T, y, rtol=1e-5, atol=1e-5)
    assert np.abs(xt).max() <= 1.0 + 1e-6  # flattened to [-1, 1]
    # Compensation keeps it exact too: W_res + [C, 0] = W̃.
    w_res, c = serq.serq_compensate(wt, R)
    y2 = xt @ np.asarray(w_res, np.float64).T + xt[:, :R] @ np.asarray(c, np.float64).T
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)
    # The Hessian maps exactly.
    h = x.astype(np.float64).T @ x / len(x)
    np.testing.assert_allclose(
        np.asarray(serq.serq_hessian(h.astype(np.float32), s, perm)),
        xt.T @ xt / len(x),
        rtol=1e-4,
        atol=1e-7,
    )


def test_compensation_matrix_is_serq_int4_per_row():
    w, x = _layer(1)
    s = serq.serq_flatten_scale(x.min(0), x.max(0))
    wt = np.asarray(serq.serq_transform(w, s, serq.serq_order(s)), np.float64)
    _, c = serq.serq_compensate(wt, R)
    blk = wt[:, :R]
    sc = np.abs(blk).max(1, keepdims=True) / 7
    want = np.sign(blk) * np.minimum(np.rint(np.abs(blk) / sc), 7) * sc
    np.testing.assert_allclose(np.asarray(c), want, rtol=1e-6)


@pytest.mark.parametrize("path", ["int", "mxfp4"])
def test_compensation_reduces_salient_block_error(path):
    w, x = _layer(2)
    s = serq.serq_flatten_scale(x.min(0), x.max(0))
    wt = serq.serq_transform(w, s, serq.serq_order(s))
    lin = serq.serq_quantize(w, x.min(0), x.max(0), path=path, r=R)
    main = serq.MAIN_INT_FMT if path == "int" else "mxfp4"
    rule = serq.MAIN_INT_RULE if path == "int" else "default"
    plain = np.asarray(F.fake_quant(wt, main, int_rule=rule))
    blk = np.asarray(wt[:, :R])
    err_comp = np.linalg.norm(blk - np.asarray(lin.w_main[:, :R] + lin.c))
    err_plain = np.linalg.norm(blk - plain[:, :R])
    assert err_comp < 0.25 * err_plain, (err_comp, err_plain)
    # The rest of the weight is plain quantization of W̃.
    np.testing.assert_array_equal(np.asarray(lin.w_main[:, R:]), plain[:, R:])


def test_runtime_uses_the_same_quantized_activation():
    w, x = _layer(3)
    b = np.linspace(-1, 1, OUT).astype(np.float32)
    lin = serq.serq_quantize(w, x.min(0), x.max(0), r=R, bias=b)
    assert isinstance(lin, Linear) and lin.in_features == K and lin.out_features == OUT
    xt = np.asarray(serq.serq_input(x, lin.s, lin.perm))
    a = np_serq_act(xt)
    want = a @ np.asarray(lin.w_main, np.float64).T + a[:, :R] @ np.asarray(lin.c, np.float64).T + b
    got = jax.jit(lambda m, v: m(v))(lin, jnp.asarray(x))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # And the whole thing beats plain W4A4 on the same flattened input by a wide margin.
    y = x.astype(np.float64) @ w.T + b
    plain = (
        np_serq_act(xt)
        @ np.asarray(
            F.fake_quant(
                serq.serq_transform(w, lin.s, lin.perm),
                serq.MAIN_INT_FMT,
                int_rule=serq.MAIN_INT_RULE,
            ),
            np.float64,
        ).T
        + b
    )
    assert np.linalg.norm(np.asarray(got) - y) < np.linalg.norm(plain - y)


def test_act_quantizer_edge_cases():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 256)).astype(np.float32) + 2.0  # all positive: no widening to 0
    x[1, :128] = 0.0  # an all-zero group
    np.testing.assert_allclose(
        np.asarray(serq.serq_act_quant(x)), np_serq_act(x), rtol=1e-6, atol=1e-7
    )
    # Width not a multiple of 128: the tail group repeats its last element (min/max unchanged).
    y = x[:, :200]
    tail = np.concatenate([y[:, 128:], np.repeat(y[:, -1:], 56, 1)], 1)
    want = np.concatenate([np_serq_act(y[:, :128]), np_serq_act(tail)[:, :72]], 1)
    np.testing.assert_allclose(np.asarray(serq.serq_act_quant(y)), want, rtol=1e-6, atol=1e-7)


def test_gptq_main_uses_the_transformed_hessian():
    w, x = _layer(5, n=600)
    h = (x.astype(np.float64).T @ x / len(x)).astype(np.float32)
    lin = serq.serq_quantize(w, x.min(0), x.max(0), w_quant="gptq", h=h, act=None)
    s, perm = lin.s, lin.perm
    w_res, _ = serq.serq_compensate(serq.serq_transform(w, s, perm), R)
    hs = serq.serq_hessian(h, s, perm)
    want = gptq_quantize(w_res, hs, serq.MAIN_INT_FMT, int_rule=serq.MAIN_INT_RULE).w_hat
    np.testing.assert_array_equal(np.asarray(lin.w_main), np.asarray(want))
    rtn = serq.serq_quantize(w, x.min(0), x.max(0), act=None)
    y = x @ w.T
    e_gptq = np.linalg.norm(np.asarray(lin(jnp.asarray(x))) - y)
    e_rtn = np.linalg.norm(np.asarray(rtn(jnp.asarray(x))) - y)
    assert e_gptq < e_rtn


def test_effective_bits():
    # MXFP4: 4.25 + 128/4096·4.25 (≈ the paper's 4.37 at 4096 wide).
    assert serq.serq_effective_bits(4096, 128, "mxfp4") == pytest.approx(4.25 * (1 + 1 / 32))
    # Int: main int4 g128 (f32 scale) + C int4 with one f32 scale per row of 128.
    assert serq.serq_effective_bits(4096, 128) == pytest.approx(4.25 + (4 + 32 / 128) / 32)
    # Cross-check against the bytes actually stored by formats.quantize.
    w, x = _layer(6)
    lin = serq.serq_quantize(w, x.min(0), x.max(0), path="mxfp4", r=R)
    nbytes = F.quantize(lin.w_main, "mxfp4").nbytes + F.quantize(lin.c, "mxfp4").nbytes
    assert 8 * nbytes / w.size == pytest.approx(serq.serq_effective_bits(K, R, "mxfp4"))
    assert serq.serq_effective_bits(K, 0) == pytest.approx(4.25)


def test_bad_inputs():
    w, x = _layer(7)
    lo, hi = x.min(0), x.max(0)
    with pytest.raises(ValueError, match="r must be"):
        serq.serq_quantize(w, lo, hi, r=K + 1)
    with pytest.raises(ValueError, match="act_min/act_max"):
        serq.serq_quantize(w, lo[:10], hi[:10])
    with pytest.raises(ValueError, match="needs h"):
        serq.serq_quantize(w, lo, hi, w_quant="gptq")
    with pytest.raises(ValueError, match="act-order"):
        serq.serq_quantize(w, lo, hi, w_quant="gptq", h=np.eye(K), act_order=True)
    with pytest.raises(ValueError, match="path"):
        serq.serq_quantize(w, lo, hi, path="fp8")
    with pytest.raises(ValueError, match="MXFP4 path"):
        serq.serq_quantize(w, lo, hi, path="mxfp4", w_quant="gptq", h=np.eye(K))
