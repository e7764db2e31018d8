"""GPTQ (docs/spec/methods.md §5) against RTN, a float64 numpy GPTQ, and its own invariants."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arhq_jax.methods.gptq import (
    gptq_quantize,
    hessian_update,
    inverse_cholesky_upper,
    rtn_quantize,
)
from arhq_jax.numerics import formats as F

OUT, K = 16, 64


def _problem(seed=0, out=OUT, k=K, n=400):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, k)).astype(np.float32)
    # Correlated inputs with uneven channel scales: a Hessian GPTQ can exploit.
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((n, k)) @ mix * rng.uniform(0.2, 3.0, k)).astype(np.float32)
    h = (2.0 * x.astype(np.float64).T @ x / n).astype(np.float32)
    return w, x, h


# ---------------------------------------------------------------- float64 numpy reference


def _np_int_sym_fit(xg, bits=4):
    a = np.abs(xg).max(1)
    s = a / (2 ** (bits - 1) - 1)
    return np.where(s > 0, s, 1.0)


def _np_int_sym_qdq(col, s, bits=4):
    hi = 2 ** (bits - 1) - 1
    return np.clip(np.rint(col / s), -hi - 1, hi) * s


def _np_nvfp4_fit(xg, g):
    raw = (np.abs(xg).max(1).astype(np.float32) / np.float32(6.0)) / np.float32(g)
    s = np.clip(raw, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (s * np.float32(g)).astype(np.float64)


def _np_nvfp4_qdq(col, d):
    v = np.clip(col / np.where(d > 0, d, 1.0), -6, 6).astype(np.float32)
    q = v.astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * d
    return np.where(d > 0, q, 0.0)


def np_gptq(w, h, fit, qdq, g, *, act_order=False, static=False, per_row=False, damp=0.01):
    """Straightforward GPTQ in float64: no lazy batching, one column at a time."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k = w.shape[1]
    if per_row:
        params = fit(w)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if static:
        groups = [fit(w[:, i : i + g]) for i in range(0, k, g)]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for i in range(k):
        if static:
            params = groups[perm[i] // g]
        elif not per_row and i % g == 0:
            params = fit(w[:, i : i + g])
        q[:, i] = qdq(w[:, i], params)
        e = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= np.outer(e, u[i, i:])
    return q[:, np.argsort(perm)]


def _assert_same_weights(got, ref, w):
    got = np.asarray(got, np.float64)
    tol = 1e-5 * np.abs(w).max()
    bad = np.abs(got - ref) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} entries differ, max {np.abs(got - ref).max()}"


# ---------------------------------------------------------------- tests


def test_matches_numpy_reference_int4_groups():
    w, _, h = _problem(1)
    spec = F.resolve_format("int4", group_size=32)
    res = gptq_quantize(w, h, spec, block_size=16)  # groups span two lazy blocks
    ref = np_gptq(w, h, _np_int_sym_fit, _np_int_sym_qdq, 32)
    _assert_same_weights(res.w_hat, ref, w)
    # Every weight sits on its group's int4 grid and the packed form decodes to it bit for bit.
    np.testing.assert_array_equal(np.asarray(F.dequantize(res.qtensor)), np.asarray(res.w_hat))
    assert res.qtensor.codes.shape == (OUT, K // 2) and res.qtensor.scales.shape == (OUT, 2)


def _np_nvfp4_ct_fit(xg, gs):
    """compressed-tensors' block scale: E4M3(gs·(a/6)), 0.125 where 0; decode fl(s/gs)."""
    raw = np.float32(gs) * (np.abs(xg).max(1).astype(np.float32) / np.float32(6.0))
    s = np.clip(raw, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = np.where(s == 0, np.float32(0.125), s)
    return (s / np.float32(gs)).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-modelopt"])
def test_matches_numpy_reference_nvfp4(fmt):
    w, _, h = _problem(2)
    res = gptq_quantize(w, h, fmt, block_size=32)
    amax = np.float32(np.abs(w).max())
    if fmt == "nvfp4":
        g = float((np.float32(1) / amax) * np.float32(2688))  # gs, as compressed-tensors
        ref = np_gptq(w, h, lambda xg: _np_nvfp4_ct_fit(xg, g), _np_nvfp4_qdq, 16)
    else:
        g = float(amax / np.float32(2688))
        ref = np_gptq(w, h, lambda xg: _np_nvfp4_fit(xg, g), _np_nvfp4_qdq, 16)
    _assert_same_weights(res.w_hat, ref, w)
    # The tensor scale is fixed from the original W.
    assert float(res.qtensor.tensor_scale) == g
    np.testing.assert_array_equal(np.asarray(F.dequantize(res.qtensor)), np.asarray(res.w_hat))


def test_act_order_static_groups_match_reference_and_unpermute():
    w, _, h = _problem(3)
    spec = F.resolve_format("int4", group_size=32)
    res = gptq_quantize(w, h, spec, block_size=16, act_order=True, static_groups=True)
    ref = np_gptq(w, h, _np_int_sym_fit, _np_int_sym_qdq, 32, act_order=True, static=True)
    _assert_same_weights(res.w_hat, ref, w)
    perm = np.asarray(res.perm)
    np.testing.assert_array_equal(np.sort(perm), np.arange(K))
    assert np.all(np.diff(np.diag(h)[perm]) <= 0)
    np.testing.assert_array_equal(np.asarray(F.dequantize(res.qtensor)), np.asarray(res.w_hat))


def test_act_order_per_row_equals_permuted_problem():
    w, _, h = _problem(4)
    spec = F.resolve_format("int4", group_size=-1)
    res = gptq_quantize(w, h, spec, block_size=16, act_order=True)
    p = np.asarray(res.perm)
    plain = gptq_quantize(w[:, p], h[p][:, p], spec, block_size=16)
    np.testing.assert_allclose(
        np.asarray(res.w_hat), np.asarray(plain.w_hat)[:, np.argsort(p)], rtol=0, atol=1e-6
    )


def test_beats_rtn_on_known_hessian():
    w, x, h = _problem(5)
    for fmt in ("nvfp4", F.resolve_format("int4", group_size=32)):
        res = gptq_quantize(w, h, fmt, block_size=16 if fmt != "nvfp4" else 32)
        e_gptq = np.linalg.norm((w - np.asarray(res.w_hat)) @ x.T)
        e_rtn = np.linalg.norm((w - np.asarray(rtn_quantize(w, fmt))) @ x.T)
        assert e_gptq < 0.85 * e_rtn, (fmt, e_gptq, e_rtn)


@pytest.mark.parametrize(
    "fmt",
    ["nvfp4", "mxfp4", F.resolve_format("int4", group_size=32, symmetric=False)],
)
def test_identity_hessian_equals_rtn(fmt):
    w, _, _ = _problem(6)
    bs = 16 if fmt == "nvfp4" else 32
    res = gptq_quantize(w, np.eye(K, dtype=np.float32), fmt, block_size=bs)
    np.testing.assert_array_equal(np.asarray(res.w_hat), np.asarray(rtn_quantize(w, fmt)))
    np.testing.assert_array_equal(np.asarray(F.dequantize(res.qtensor)), np.asarray(res.w_hat))


def test_tiles_identity_hessian_equals_rtn_and_odd_shapes():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((20, 40)).astype(np.float32)  # pads rows to 32, columns to 48
    spec = F.resolve_format("nvfp4-paper", tile=(16, 16))
    res = gptq_quantize(w, np.eye(40, dtype=np.float32), spec, block_size=16)
    np.testing.assert_array_equal(np.asarray(res.w_hat), np.asarray(rtn_quantize(w, spec)))
    assert res.qtensor.scales.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(F.dequantize(res.qtensor)), np.asarray(res.w_hat))


def test_dead_inputs():
    w, _, h = _problem(8)
    dead = [5, 40]
    h = h.copy()
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    spec = F.resolve_format("int4", group_size=32)
    res = gptq_quantize(w, h, spec, block_size=16)
    got = np.asarray(res.w_hat)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:, dead], 0.0)
    _assert_same_weights(got, np_gptq(w, h, _np_int_sym_fit, _np_int_sym_qdq, 32), w)


def test_mixed_precision_last_columns_int8():
    w, x, h = _problem(9)
    lo = F.resolve_format("int4", group_size=-1)
    hi = F.resolve_format("int8", group_size=-1)
    res = gptq_quantize(w, np.eye(K, dtype=np.float32), lo, high_fmt=hi, n_high=8, block_size=16)
    got = np.asarray(res.w_hat)
    np.testing.assert_array_equal(got[:, :56], np.asarray(rtn_quantize(w[:, :56], lo)))
    np.testing.assert_array_equal(got[:, 56:], np.asarray(rtn_quantize(w[:, 56:], hi)))
    q_lo, q_hi = res.qtensor
    np.testing.assert_array_equal(np.asarray(F.dequantize(q_lo)), got[:, :56])
    np.testing.assert_array_equal(np.asarray(F.dequantize(q_hi)), got[:, 56:])
    res_h = gptq_quantize(w, h, lo, high_fmt=hi, n_high=8, block_size=16)
    e = np.linalg.norm((w - np.asarray(res_h.w_hat)) @ x.T)
    assert e < np.linalg.norm((w - got) @ x.T)


def test_mse_clip_never_worse_in_its_norm():
    w, _, _ = _problem(10)
    w[:, 0] *= 8.0  # an outlier column makes clipping worthwhile
    spec = F.resolve_format("int4", group_size=-1)
    eye = np.eye(K, dtype=np.float32)
    plain = np.asarray(gptq_quantize(w, eye, spec, block_size=16).w_hat)
    clip = np.asarray(gptq_quantize(w, eye, spec, block_size=16, mse_clip=True).w_hat)
    e_plain = (np.abs(plain - w) ** 2.4).sum(1)
    e_clip = (np.abs(clip - w) ** 2.4).sum(1)
    assert np.all(e_clip <= e_plain * (1 + 1e-6)) and np.any(e_clip < 0.9 * e_plain)
    # Brute force of QuaRot's grid for one row.
    row = w[3].astype(np.float64)
    amax = np.abs(row).max()
    errs = [
        (np.abs(_np_int_sym_qdq(row, p * amax / 7) - row) ** 2.4).sum()
        for p in 1 - np.arange(80) / 100
    ]
    assert e_clip[3] == pytest.approx(min(errs), rel=1e-4)


def test_hessian_update_running_mean():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 50, 8)).astype(np.float32)
    h, n = jnp.zeros((8, 8)), 0
    for chunk in x:
        h, n = hessian_update(h, n, chunk)
    flat = x.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(np.asarray(h), 2 * flat.T @ flat / 150, rtol=1e-5)
    assert int(n) == 150
    mask = np.arange(50) < 20
    hm, nm = hessian_update(jnp.zeros((8, 8)), 0, x[0], mask=mask)
    np.testing.assert_allclose(np.asarray(hm), 2 * flat[:20].T @ flat[:20] / 20, rtol=1e-5)
    assert int(nm) == 20


def test_cholesky_retry_adds_damping():
    h = np.diag([1.0, 1.0, 1.0, -0.02]).astype(np.float32)
    u, tries = inverse_cholesky_upper(h, 0.01)
    # mean(diag) = 0.745: damping 0.00745·(1 + 0.1k) exceeds 0.02 first at k = 17.
    assert int(tries) == 17
    damped = h + 0.00745 * 2.7 * np.eye(4)
    np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.linalg.inv(damped), rtol=1e-4)


def test_bad_inputs():
    w, _, h = _problem(12)
    g32 = F.resolve_format("int4", group_size=32)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, h, g32, act_order=True)
    with pytest.raises(ValueError, match=r"h must be \[in, in\]"):
        gptq_quantize(w, h[:-1], g32)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(np.full_like(w, np.nan), h, g32)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(w, h, g32, percdamp=0.0)
    with pytest.raises(ValueError, match="multiple or a divisor"):
        gptq_quantize(w, h, g32, block_size=24)
    with pytest.raises(ValueError, match="mse_clip"):
        gptq_quantize(w, h, "mxfp4", mse_clip=True)  # nvfp4: the scale search
    with pytest.raises(ValueError, match="per-row int"):
        gptq_quantize(w, h, g32, high_fmt="int8", n_high=8)
    with pytest.raises(ValueError, match="unknown format"):
        gptq_quantize(w, h, "fp3")
