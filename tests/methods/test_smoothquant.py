"""SmoothQuant scales and folding (docs/spec/methods.md §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.methods import smoothquant as sq


def _rmsnorm(x, g, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(g, np.float64)


def _rng_stats(seed=0, d=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, d)).astype(np.float32)
    x[:, 3] *= 40.0  # an outlier channel
    x[:, 17] *= 25.0
    ws = [rng.standard_normal((n, d)).astype(np.float32) * 0.1 for n in (48, 16, 16)]
    return rng, x, ws


def test_scales_match_numpy_reference():
    _, x, ws = _rng_stats()
    m_x = np.abs(x).max(0)
    for alpha in (0.5, 0.75, 0.0, 1.0):
        s = np.asarray(sq.smoothquant_scales(jnp.asarray(m_x), ws, alpha))
        m_w = np.maximum(np.concatenate(ws, 0).__abs__().max(0).astype(np.float64), 1e-5)
        ref = np.maximum(m_x.astype(np.float64) ** alpha / m_w ** (1 - alpha), 1e-5)
        np.testing.assert_allclose(s, ref, rtol=2e-6)


def test_alpha_half_balances_activation_and_weight_ranges():
    _, x, ws = _rng_stats(1)
    m_x = np.abs(x).max(0)
    s = np.asarray(sq.smoothquant_scales(m_x, ws, 0.5), np.float64)
    after_x = m_x / s
    after_w = np.abs(np.concatenate(ws, 0)).max(0) * s
    # With α = 0.5 both sides end at sqrt(m_x·m_w).
    np.testing.assert_allclose(after_x, after_w, rtol=1e-5)
    # The outlier channels are flattened: their range ratio to the median drops.
    assert after_x[3] / np.median(after_x) < 0.25 * m_x[3] / np.median(m_x)


def test_fold_leaves_norm_linear_output_unchanged():
    rng, x, ws = _rng_stats(2)
    gamma = (1.0 + 0.1 * rng.standard_normal(x.shape[1])).astype(np.float32)
    s = sq.smoothquant_scales(np.abs(x).max(0), ws, 0.5)
    new_g, new_ws = sq.fold_smoothing(gamma, ws, s)
    assert new_g.dtype == jnp.float32 and all(w.dtype == jnp.float32 for w in new_ws)
    h_ref = _rmsnorm(x, gamma)
    h_new = np.asarray(_rmsnorm(x, new_g), np.float32)
    for w, w_new in zip(ws, new_ws, strict=True):
        y_ref = h_ref @ np.asarray(w, np.float64).T
        y_new = jnp.einsum("tk,nk->tn", h_new, w_new, precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(np.asarray(y_new), y_ref, rtol=1e-4, atol=1e-5)
    # The smoothed input really is flatter.
    assert np.abs(h_new).max(0).max() < np.abs(h_ref).max(0).max()


def test_dead_channel_gets_the_floor():
    m_x = np.array([0.0, 2.0, 3.0], np.float32)
    ws = [np.array([[0.0, 1.0, 2.0]], np.float32)]
    s = np.asarray(sq.smoothquant_scales(m_x, ws, 0.5))
    assert s[0] == pytest.approx(1e-5)
    assert s[1] == pytest.approx(np.sqrt(2.0) / 1.0, rel=1e-6)


def test_fold_up_down_is_exact():
    rng = np.random.default_rng(3)
    d, i = 32, 48
    x = rng.standard_normal((50, d)).astype(np.float32)
    wg = rng.standard_normal((i, d)).astype(np.float32) * 0.2
    wu = rng.standard_normal((i, d)).astype(np.float32) * 0.2
    wd = rng.standard_normal((d, i)).astype(np.float32) * 0.2

    def mlp(wu_, wd_):
        g = x @ wg.T
        return (g / (1 + np.exp(-g)) * (x @ wu_.T)) @ wd_.T

    act = (x @ wg.T) / (1 + np.exp(-(x @ wg.T))) * (x @ wu.T)
    s = sq.smoothquant_scales(np.abs(act).max(0), [wd], 0.5)
    new_u, _, new_d = sq.fold_into_producer(wu, wd, s)
    np.testing.assert_allclose(
        mlp(np.asarray(new_u), np.asarray(new_d)), mlp(wu, wd), rtol=1e-4, atol=1e-5
    )


def test_fold_o_v_with_gqa_is_exact():
    rng = np.random.default_rng(4)
    nh, nkv, hd, d, t = 4, 2, 8, 24, 10
    x = rng.standard_normal((t, d)).astype(np.float32)
    wv = rng.standard_normal((nkv * hd, d)).astype(np.float32) * 0.3
    bv = rng.standard_normal(nkv * hd).astype(np.float32) * 0.1
    wo = rng.standard_normal((d, nh * hd)).astype(np.float32) * 0.3
    logits = rng.standard_normal((nh, t, t))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    def attn(wv_, bv_, wo_):
        v = (x @ wv_.T + bv_).reshape(t, nkv, hd)
        heads = [p[h] @ v[:, h // (nh // nkv)] for h in range(nh)]
        return np.concatenate(heads, -1) @ wo_.T

    o_in = np.concatenate(
        [p[h] @ (x @ wv.T + bv).reshape(t, nkv, hd)[:, h // 2] for h in range(nh)], -1
    )
    s_v, s_o = sq.o_v_scales(np.abs(o_in).max(0), wo, nh, nkv, hd, 0.5)
    # Shared across the query heads of each KV head.
    so = np.asarray(s_o).reshape(nkv, nh // nkv, hd)
    np.testing.assert_array_equal(so[:, 0], so[:, 1])
    new_v, new_b, new_o = sq.fold_o_v(wv, wo, s_v, s_o, v_b=bv)
    np.testing.assert_allclose(
        attn(np.asarray(new_v), np.asarray(new_b), np.asarray(new_o)),
        attn(wv, bv, wo),
        rtol=1e-4,
        atol=1e-5,
    )


def test_bad_inputs():
    ws = [np.ones((4, 8), np.float32)]
    with pytest.raises(ValueError, match="act_absmax"):
        sq.smoothquant_scales(np.ones(7, np.float32), ws)
    with pytest.raises(ValueError, match="alpha"):
        sq.smoothquant_scales(np.ones(8, np.float32), ws, 1.5)
    with pytest.raises(ValueError, match="in=6"):
        sq.smoothquant_scales(np.ones(8, np.float32), ws + [np.ones((2, 6))])
    with pytest.raises(ValueError, match="finite"):
        sq.smoothquant_scales(np.full(8, np.nan, np.float32), ws)
    with pytest.raises(ValueError, match="num_heads"):
        sq.gqa_group_max(np.ones(10), 4, 2, 3)
