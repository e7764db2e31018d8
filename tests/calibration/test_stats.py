"""Streaming statistics against one-shot and numpy float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.calibration.stats import StatsConfig, finalize, init_stats, update_stats
from arhq_jax.numerics import formats as F
from arhq_jax.numerics.formats import fake_quant

D = 48
ALL = dict(keep_h=True, keep_absmax=True, keep_minmax=True, keep_moments=True)


def _tokens(n, seed=0, d=D):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 7] *= 40.0  # an outlier channel
    return x + 0.3


def _stream(x, cfg, chunk, mask=None, **kw):
    st = init_stats(x.shape[-1], cfg)
    for i in range(0, x.shape[0], chunk):
        m = None if mask is None else mask[i : i + chunk]
        st = update_stats(st, x[i : i + chunk], cfg, mask=m, **kw)
    return finalize(st)


def _close(got, ref, rtol=2e-5, msg=""):
    """Elementwise rtol, plus an absolute slack of rtol·max|ref| for cancelling off-diagonals."""
    ref = np.asarray(ref, np.float64)
    atol = rtol * float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=rtol, atol=atol, err_msg=msg)


def _numpy_ref(x, e):
    """Every statistic in float64 from the f32 tokens and the f32 residual E."""
    x64, e64 = x.astype(np.float64), np.asarray(e, np.float64)
    n = x.shape[0]
    return {
        "G": e64.T @ e64 / n,
        "H": x64.T @ x64 / n,
        "absmax": np.abs(x64).max(0),
        "min": x64.min(0),
        "max": x64.max(0),
        "mean": x64.mean(0),
        "mean_sq": (x64**2).mean(0),
        "count": n,
    }


@pytest.mark.parametrize("fmt", ["nvfp4-paper", "mxfp4", "int4"])
def test_streaming_equals_one_shot_and_numpy(fmt):
    x = _tokens(300)
    cfg = StatsConfig(act_fmt=fmt, **ALL)
    one = _stream(x, cfg, 300)
    chunked = _stream(x, cfg, 64)  # uneven last chunk
    assert one["count"] == chunked["count"] == 300
    for k in ("G", "H", "absmax", "min", "max", "mean", "mean_sq"):
        _close(chunked[k], one[k], 2e-5, k)
    e = x - np.asarray(fake_quant(jnp.asarray(x), fmt))
    ref = _numpy_ref(x, e)
    for k in ("G", "H", "absmax", "min", "max", "mean", "mean_sq"):
        _close(one[k], ref[k], 2e-5, k)
    assert one["G"].shape == (D, D) and one["G"].dtype == jnp.float32
    np.testing.assert_array_equal(one["G"], one["G"].T)
    assert float(jnp.trace(one["G"])) > 0


def test_nvfp4_tensor_scale_dynamic_per_chunk_or_fixed():
    x = _tokens(128, seed=1)
    cfg = StatsConfig(act_fmt="nvfp4", keep_absmax=False)
    # Dynamic: each chunk gets its own tensor scale, exactly as a fake_quant of that chunk.
    chunked = _stream(x, cfg, 32)
    e = np.concatenate(
        [x[i : i + 32] - np.asarray(fake_quant(x[i : i + 32], "nvfp4")) for i in range(0, 128, 32)]
    )
    _close(chunked["G"], _numpy_ref(x, e)["G"])
    # Fixed tensor scale: chunking no longer matters.
    ts = float(F.nvfp4_tensor_scale(x))  # gs = 2688/amax (compressed-tensors convention)
    assert ts == pytest.approx(2688.0 / float(np.abs(x).max()), rel=1e-6)
    fixed_one = _stream(x, cfg, 128, tensor_scale=ts)
    fixed_chunked = _stream(x, cfg, 32, tensor_scale=ts)
    _close(fixed_chunked["G"], fixed_one["G"])
    e_fixed = x - np.asarray(fake_quant(x, "nvfp4", tensor_scale=ts))
    _close(fixed_one["G"], _numpy_ref(x, e_fixed)["G"])


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-paper"])
def test_masked_tokens_have_no_effect(fmt):
    x = _tokens(40, seed=2).reshape(4, 10, D)
    garbage = np.full((4, 3, D), 1e4, np.float32)
    garbage[..., 7] = -5e4
    padded = np.concatenate([x, garbage], axis=1)  # [4, 13, D]
    mask = np.arange(13)[None, :].repeat(4, 0) < 10
    cfg = StatsConfig(act_fmt=fmt, **ALL)
    got = _stream(padded, cfg, 2, mask=mask)
    ref = _stream(x, cfg, 2)
    assert got["count"] == ref["count"] == 40
    for k in ("G", "H", "absmax", "min", "max", "mean", "mean_sq"):
        _close(got[k], ref[k], 1e-5, k)


def test_bf16_input_is_upcast():
    x = _tokens(64, seed=3)
    xb = jnp.asarray(x, jnp.bfloat16)
    cfg = StatsConfig(act_fmt="nvfp4-paper", keep_h=True)
    got = _stream(xb, cfg, 64)
    x32 = np.asarray(xb.astype(jnp.float32))
    ref = _numpy_ref(x32, x32 - np.asarray(fake_quant(x32, "nvfp4-paper")))
    _close(got["G"], ref["G"])
    np.testing.assert_allclose(got["H"], ref["H"], rtol=2e-5)


def test_float64_path():
    x = _tokens(200, seed=4)
    e = x - np.asarray(fake_quant(x, "nvfp4-paper"))
    ref = _numpy_ref(x, e)
    with jax.enable_x64(True):
        cfg = StatsConfig(act_fmt="nvfp4-paper", dtype="float64", **ALL)
        got = _stream(x, cfg, 48)
        assert got["G"].dtype == jnp.float64 and got["mean"].dtype == jnp.float64
    for k in ("G", "H", "absmax", "min", "max", "mean", "mean_sq"):
        _close(got[k], ref[k], 1e-12, k)


def test_update_under_jit_and_only_requested_keys():
    x = _tokens(32, seed=5)
    cfg = StatsConfig(act_fmt="int8", keep_absmax=False)
    st = jax.jit(lambda s, x: update_stats(s, x, cfg))(init_stats(D, cfg), x)
    out = finalize(st)
    assert sorted(out) == ["G", "count"]
    cfg2 = StatsConfig(keep_moments=True)  # no act_fmt: no G
    out2 = finalize(update_stats(init_stats(D, cfg2), x, cfg2))
    assert sorted(out2) == ["absmax", "count", "mean", "mean_sq"]


def test_bad_input():
    cfg = StatsConfig(act_fmt="nvfp4-paper")
    st = init_stats(D, cfg)
    with pytest.raises(ValueError, match="last axis"):
        update_stats(st, np.ones((4, D + 1), np.float32), cfg)
    with pytest.raises(ValueError, match="mask"):
        update_stats(st, np.ones((4, D), np.float32), cfg, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="floating"):
        update_stats(st, np.ones((4, D), np.int32), cfg)
    with pytest.raises(ValueError, match="count is 0"):
        finalize(st)
    with pytest.raises(ValueError, match="act_fmt"):
        StatsConfig(keep_g=True)
    with pytest.raises(ValueError, match="unknown format"):
        StatsConfig(act_fmt="fp5")
    with pytest.raises(ValueError, match="dtype"):
        StatsConfig(dtype="float16")
    with pytest.raises(ValueError, match="enable_x64"):
        init_stats(D, StatsConfig(act_fmt="int8", dtype="float64"))
    with pytest.raises(ValueError, match="positive int"):
        init_stats(0, cfg)


@pytest.mark.parametrize("d", [100, 300, 577])  # full product below GRAM_MIN_DIM; uneven blocks
def test_sym_gram_equals_full_product_and_numpy(d):
    """The block-triangular Gram equals jnp's full aᵀa (f32) and numpy f64, and is exactly
    symmetric; the f64 path matches numpy to 1e-12."""
    from arhq_jax.calibration.stats import sym_gram

    rng = np.random.default_rng(d)
    a = (rng.standard_normal((333, d)) * np.exp(rng.normal(0, 1, d))).astype(np.float32)
    got = np.asarray(jax.jit(sym_gram)(jnp.asarray(a)))
    if d >= 256:  # blocked: exactly symmetric
        np.testing.assert_array_equal(got, got.T)
    ref64 = a.astype(np.float64).T @ a.astype(np.float64)
    scale = np.sqrt(np.outer(np.diag(ref64), np.diag(ref64)))
    assert np.max(np.abs(got - ref64) / scale) < 2e-6
    full = np.asarray(jnp.matmul(a.T, a, precision=jax.lax.Precision.HIGHEST))
    assert np.max(np.abs(got - full) / scale) < 2e-6
    with jax.enable_x64(True):
        g64 = np.asarray(sym_gram(jnp.asarray(a, jnp.float64)))
    assert g64.dtype == np.float64
    np.testing.assert_allclose(g64, ref64, rtol=1e-12, atol=1e-12 * scale.max())
