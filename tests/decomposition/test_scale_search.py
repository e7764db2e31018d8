"""The searched NVFP4 block scales (arhq_jax.decomposition.scale_search) against a numpy /
ml_dtypes brute
force over every E4M3 code of the window, and GPTQ's ``mse_clip`` for nvfp4."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arhq_jax.decomposition import scale_search as S
from arhq_jax.methods.gptq import gptq_quantize
from arhq_jax.numerics import formats as F
from tests._fp4_numpy import e2m1_codes

SPEC = F.resolve_format("nvfp4")
E2M1_MAG = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def _e4m3(code: int) -> float:
    return float(np.array([code], np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)[0])


def _error_np(block: np.ndarray, s: float, gs: float, w: np.ndarray) -> float:
    """float64 weighted error of one 16-block under stored scale s (compressed-tensors decode:
    d = fl32(s / gs), FP4 codes by the ml_dtypes RNE cast of clip(x / d, ±6))."""
    d = np.float32(np.float32(s) / np.float32(gs))
    v = np.clip(block.astype(np.float32) / d, -6, 6)
    mag = E2M1_MAG[e2m1_codes(np.abs(v)) & 7]
    q = np.sign(block) * mag * np.float64(d)
    return float(np.sum(w * (q - block.astype(np.float64)) ** 2))


def _data(seed: int, rows: int = 48, cols: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * np.exp(rng.standard_normal((rows, 1)))
    x[::7, ::5] *= 8.0  # outliers: the clipping candidates matter
    return x.astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True])
def test_search_is_the_brute_force_minimum_of_the_window(weighted):
    x = _data(0)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.1, 3.0, (x.shape[0], x.shape[1] // 16, 16)) if weighted else None
    gs = float(F.nvfp4_tensor_scale(jnp.asarray(x), SPEC))
    xb = jnp.asarray(x).reshape(x.shape[0], -1, 16)
    s, d = S.search_scales(xb, SPEC, gs, None if w is None else jnp.asarray(w, jnp.float32))
    s0, _, _ = F.block_params(xb, SPEC, gs)
    codes = np.asarray(s).view(np.uint8)
    codes0 = np.asarray(s0).view(np.uint8)
    blocks = np.asarray(xb)
    wts = np.ones(blocks.shape) if w is None else w
    changed = 0
    for i in range(blocks.shape[0]):
        for j in range(blocks.shape[1]):
            c0 = int(codes0[i, j])
            window = sorted({min(max(c0 + k, 1), 0x7E) for k in (0, *S.SEARCH_STEPS)})
            errs = {c: _error_np(blocks[i, j], _e4m3(c), gs, wts[i, j]) for c in window}
            best = min(errs.values())
            got = errs[int(codes[i, j])]
            assert got <= best * (1 + 1e-5) + 1e-12, (i, j, got, best)
            assert got <= errs[c0] * (1 + 1e-6) + 1e-12  # never worse than the amax rule
            changed += int(codes[i, j]) != c0
    assert changed > blocks.shape[0]  # the search does move scales on this data
    # d is the decode multiplier of the chosen scale
    np.testing.assert_array_equal(np.asarray(d), np.asarray(F.scale_multiplier(s, SPEC, gs)))


def test_search_lowers_the_total_error():
    x = _data(2)
    gs = F.nvfp4_tensor_scale(jnp.asarray(x), SPEC)
    xb = jnp.asarray(x).reshape(x.shape[0], -1, 16)
    s, _ = S.search_scales(xb, SPEC, gs)
    s0, _, _ = F.block_params(xb, SPEC, gs)
    e, e0 = S.block_error(xb, s, SPEC, gs), S.block_error(xb, s0, SPEC, gs)
    assert float(jnp.sum(e)) < 0.95 * float(jnp.sum(e0))  # measured 0.913


def test_zero_and_nan_blocks_keep_the_amax_rule():
    x = _data(3, rows=4, cols=32)
    x[1, :16] = 0.0
    x[2, 16:] = np.nan
    gs = jnp.float32(100.0)
    xb = jnp.asarray(x).reshape(4, 2, 16)
    s, _ = S.search_scales(xb, SPEC, gs)
    s0, _, _ = F.block_params(xb, SPEC, gs)
    assert float(s[1, 0].astype(jnp.float32)) == float(s0[1, 0].astype(jnp.float32))
    assert np.isnan(float(s[2, 1].astype(jnp.float32)))


def test_other_formats_are_refused():
    with pytest.raises(ValueError, match="nvfp4"):
        S.search_scales(jnp.zeros((2, 1, 32)), F.resolve_format("mxfp4"), 1.0)
    with pytest.raises(ValueError, match="mse_clip applies to int formats and nvfp4"):
        gptq_quantize(jnp.ones((4, 32)), jnp.eye(32), "mxfp4", mse_clip=True)


def test_gptq_mse_clip_at_identity_hessian_is_the_searched_rtn():
    """At H = I GPTQ adds no error feedback between columns, so with ``mse_clip`` it must equal
    round-to-nearest under the searched block scales."""
    x = _data(4, rows=32, cols=48)
    gs = F.nvfp4_tensor_scale(jnp.asarray(x), SPEC)
    r = gptq_quantize(x, jnp.eye(48), "nvfp4", mse_clip=True, tensor_scale=gs)
    xb = jnp.asarray(x).reshape(32, 3, 16)
    _, d = S.search_scales(xb, SPEC, gs)
    rtn = F.dequantize_blocks(F.quantize_blocks(xb, d, None, SPEC), d, None, SPEC)
    np.testing.assert_array_equal(np.asarray(r.w_hat), np.asarray(rtn).reshape(32, 48))
    np.testing.assert_array_equal(np.asarray(F.dequantize(r.qtensor)), np.asarray(r.w_hat))
    plain = gptq_quantize(x, jnp.eye(48), "nvfp4", tensor_scale=gs)
    assert float(jnp.sum((r.w_hat - x) ** 2)) < float(jnp.sum((plain.w_hat - x) ** 2))


def test_gptq_mse_clip_packs_its_own_values():
    x = _data(5, rows=32, cols=64)
    rng = np.random.default_rng(6)
    a = rng.standard_normal((256, 64)).astype(np.float32)
    h = jnp.asarray(a.T @ a / 256)
    r = gptq_quantize(x, h, "nvfp4", mse_clip=True)
    np.testing.assert_array_equal(np.asarray(F.dequantize(r.qtensor)), np.asarray(r.w_hat))
    assert bool(jnp.all(jnp.isfinite(r.w_hat)))
