"""FPRAG-AWQ and its dynamic heuristic (docs/spec/methods.md §6) against numpy ports and brute
force."""

import numpy as np
import pytest

from arhq_jax.methods import awq
from arhq_jax.numerics import formats as F

# ---------------------------------------------------------------- numpy references


def np_fprag(w, g=128):
    out, k = w.shape
    kp = -(-k // g) * g
    wp = np.zeros((out, kp), np.float64)
    wp[:, :k] = w
    wg = wp.reshape(out, -1, g)
    lo, hi = wg.min(2, keepdims=True), wg.max(2, keepdims=True)
    sc = np.maximum((hi - lo) / 15, 1e-8)
    zp = np.clip(np.rint(-lo / sc), 0, 15)
    sc = np.broadcast_to(sc, wg.shape).reshape(out, kp)
    zp = np.broadcast_to(zp, wg.shape).reshape(out, kp)
    wdiv = wp / sc
    wint = np.clip(np.rint(wdiv + zp), 0, 15)
    return wp, wdiv, wint, sc, zp


def np_knee(y, tol=0.0):
    n = len(y)
    y = np.asarray(y, np.float64)
    yn = (y - y.min()) / (y.max() - y.min())
    xn = np.linspace(0, 1, n)
    line = yn[0] + (yn[-1] - yn[0]) * xn
    i = int(np.argmax(np.abs(yn - line)))
    return min(i + int(tol * n), n - 1) if i < n - 1 else i


def np_dh(w, mu, g=128, max_flip=0.01):
    """Row-by-row port of awq_dh_xl.quantize_weight_heuristic_groupwise."""
    out, k = w.shape
    wp, wdiv, wint, sc, zp = np_fprag(w, g)
    kp = wp.shape[1]
    mup = np.zeros(kp)
    mup[:k] = mu
    srt = np.sort(np.abs(mup))[::-1]
    thr = srt[np_knee(srt[: kp // 2])]
    cap = int(max_flip * k)
    wint = wint.copy()
    for i in range(out):
        e = np.sum((wp[i] - (wint[i] - zp[i]) * sc[i]) * mup)
        frac = wdiv[i] + zp[i] - wint[i]
        d = np.where(np.sign(frac) == 0, 1.0, np.sign(frac))
        imp = mup * d * sc[i]
        ok = (np.sign(imp) == np.sign(e)) & (wint[i] + d >= 0) & (wint[i] + d <= 15)
        ok &= ~(np.abs(mup) > thr)
        cand = sorted(np.nonzero(ok)[0], key=lambda j: -abs(frac[j]))
        c = np.concatenate([[0.0], np.cumsum(imp[cand])])
        best = int(np.argmin(np.abs(e - c)))
        for j in cand[: min(best, cap)]:
            wint[i, j] = np.clip(wint[i, j] + d[j], 0, 15)
    return ((wint - zp) * sc)[:, :k]


def _layer(seed, out=32, k=256, n=300):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, k)) * 0.05).astype(np.float32)
    scale = rng.uniform(0.3, 2.0, k)
    scale[rng.choice(k, 4, replace=False)] = 15.0  # salient channels
    x = (rng.standard_normal((n, k)) * scale + 0.3 * rng.standard_normal(k)).astype(np.float32)
    return w, x


# ---------------------------------------------------------------- tests


def test_fprag_quantizer_matches_formats_and_vector_i2():
    w, _ = _layer(0)
    got = np.asarray(awq.fprag_quantize(w, 128))
    want = np.asarray(F.fake_quant(w, "int4-asym", group_size=128, int_rule="fprag"))
    np.testing.assert_array_equal(got, want)
    x = np.array([[-1.5, 0, 0.25, 6, 2.75, -0.75, 1, 3.3]], np.float32)
    np.testing.assert_array_equal(
        np.asarray(awq.fprag_quantize(x, 8))[0], [-1.5, 0, 0.5, 6, 2.5, -0.5, 1, 3.5]
    )
    # The reference pads the last group with zeros, which widens its range.
    w2 = np.full((1, 12), 2.0, np.float32) + np.arange(12, dtype=np.float32) * 0.1
    ref = np_fprag(w2.astype(np.float64), 8)
    np.testing.assert_allclose(
        np.asarray(awq.fprag_quantize(w2, 8)), ((ref[2] - ref[4]) * ref[3])[:, :12], rtol=1e-6
    )


def test_kneedle_finds_known_knee():
    # Convex, piecewise linear: the distance to the chord peaks at the break (index 5).
    y = np.concatenate([100 - 18.0 * np.arange(6), 10 - 0.5 * np.arange(1, 15)])
    assert int(awq.kneedle_index(y)) == 5 == np_knee(y)
    assert int(awq.kneedle_index(y, 0.1)) == 7
    assert int(awq.kneedle_index(np.ones(10))) == 5  # flat: n // 2
    rng = np.random.default_rng(1)
    mu = np.concatenate([y, rng.uniform(0, 2.5, 20)]) * rng.choice([-1, 1], 40)
    mu = mu[rng.permutation(40)]
    thr = float(awq.outlier_threshold(mu))
    assert thr == 10.0
    assert int(np.sum(np.abs(mu) > thr)) == 5


def test_dh_matches_numpy_port_and_never_increases_row_error():
    w, x = _layer(2)
    mu = x.mean(0)
    mu[7] = 40.0  # one outlier channel: never flipped
    for max_flip in (0.01, 1.0):
        w_hat, flips, outl = awq.dh_quantize(w, mu, 128, 0.0, max_flip)
        np.testing.assert_allclose(np.asarray(w_hat), np_dh(w, mu, 128, max_flip), atol=1e-7)
        e_plain = np.abs(np.asarray(awq.dh_row_error(w, awq.fprag_quantize(w), mu)))
        e_dh = np.abs(np.asarray(awq.dh_row_error(w, w_hat, mu)))
        assert np.all(e_dh <= e_plain * (1 + 1e-5) + 1e-7)
        assert e_dh.mean() < (0.99 if max_flip < 1 else 0.2) * e_plain.mean()
        assert bool(outl[7])
    # Flip count is what changed.
    changed = np.sum(np.asarray(w_hat) != np.asarray(awq.fprag_quantize(w)), axis=1)
    np.testing.assert_array_equal(changed, np.asarray(flips))


def test_flip_cap_holds():
    w, x = _layer(3)
    mu = x.mean(0)
    _, flips_free, _ = awq.dh_quantize(w, mu, 128, 0.0, 1.0)
    assert int(np.max(flips_free)) > 2  # the cap below binds
    w_hat, flips, _ = awq.dh_quantize(w, mu, 128, 0.0, 0.01)
    assert int(np.max(flips)) <= 2  # ⌊0.01·256⌋
    changed = np.sum(np.asarray(w_hat) != np.asarray(awq.fprag_quantize(w)), axis=1)
    assert changed.max() <= 2
    # Scales and zero points are never refit: every value stays on the group's grid.
    _, _, _, sc, zp = np_fprag(w.astype(np.float64))
    lv = np.asarray(w_hat, np.float64) / sc + zp
    np.testing.assert_allclose(lv, np.rint(lv), atol=1e-4)


def test_alpha_search_matches_brute_force():
    w, x = _layer(4)
    sal = (x.astype(np.float64) ** 2).mean(0)
    res = awq.awq_quantize(w, x, sal)
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    losses = []
    for a in np.arange(21) / 20:
        s = np.maximum(sal**a, 1e-5)
        _, _, wint, sc, zp = np_fprag(w * s[None, :])
        wq = (wint - zp) * sc / s[None, :]
        losses.append(np.mean((y - x @ wq.T) ** 2))
    losses = np.array(losses)
    np.testing.assert_allclose(np.asarray(res.losses[0]), losses, rtol=2e-3)
    a_star = int(np.argmin(losses))
    assert sorted(losses)[1] > losses[a_star] * 1.01  # a clear winner, no near-tie
    assert float(res.alpha[0]) == pytest.approx(a_star / 20)
    assert 0 < a_star  # salience scaling helps here
    s = np.maximum(sal ** (a_star / 20), 1e-5)
    _, _, wint, sc, zp = np_fprag(w * s[None, :])
    np.testing.assert_allclose(np.asarray(res.w_hat), (wint - zp) * sc / s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(res.scales[0]), s, rtol=1e-5)


def test_alpha_zero_is_plain_rtn_and_ties_keep_smaller_alpha():
    w, x = _layer(5)
    res = awq.awq_quantize(w, x, np.ones(w.shape[1]))  # s = 1 for every α: all tie
    assert float(res.alpha[0]) == 0.0
    np.testing.assert_array_equal(np.asarray(res.w_hat), np.asarray(awq.fprag_quantize(w)))
    sal = (x.astype(np.float64) ** 2).mean(0)
    res2 = awq.awq_quantize(w, x, sal)
    rtn = np.asarray(awq.fprag_quantize(w), np.float64)
    want = np.mean((x @ w.T.astype(np.float64) - x @ rtn.T) ** 2)
    assert float(res2.losses[0, 0]) == pytest.approx(want, rel=1e-3)


def test_dh_search_and_out_chunks():
    w, x = _layer(6, out=24)
    sal, mu = (x**2).mean(0), x.mean(0)
    res = awq.awq_quantize(w, x, sal, mean_x=mu, rounding="dh", n_out_chunks=3)
    assert res.alpha.shape == (3,) and res.losses.shape == (3, 21)
    for c in range(3):
        one = awq.awq_quantize(w[8 * c : 8 * c + 8], x, sal, mean_x=mu, rounding="dh")
        np.testing.assert_array_equal(
            np.asarray(res.w_hat[8 * c : 8 * c + 8]), np.asarray(one.w_hat)
        )
        a = float(one.alpha[0])
        s = np.maximum(sal, 1e-5) ** a  # DH code clamps before the power
        ref = np_dh(w[8 * c : 8 * c + 8] * s, mu / s) / s
        np.testing.assert_allclose(np.asarray(one.w_hat), ref, rtol=1e-4, atol=1e-6)


def test_bad_inputs():
    w, x = _layer(7, out=4, k=128, n=10)
    sal = np.ones(128)
    with pytest.raises(ValueError, match="mean_x"):
        awq.awq_quantize(w, x, sal, rounding="dh")
    with pytest.raises(ValueError, match="rounding"):
        awq.awq_quantize(w, x, sal, rounding="up")
    with pytest.raises(ValueError, match="salience must be"):
        awq.awq_quantize(w, x, sal[:5])
    with pytest.raises(ValueError, match="x must be"):
        awq.awq_quantize(w, x[:, :5], sal)
    with pytest.raises(ValueError, match="NaN"):
        awq.awq_quantize(w, np.full_like(x, np.nan), sal)
    with pytest.raises(ValueError, match="n_out_chunks"):
        awq.awq_quantize(w, x, sal, n_out_chunks=5)
