"""ResQ (docs/spec/methods.md §8): bases, rotations, mixed precision, Hadamard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.linears.base import Linear
from arhq_jax.methods import resq
from arhq_jax.numerics import formats as F

D = 64


def _acts(seed=0, n=2000, d=D):
    rng = np.random.default_rng(seed)
    # A low-rank high-variance part plus isotropic noise and a few outlier channels.
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    spec = np.concatenate([np.full(d - 8, 0.5), np.linspace(4, 12, 8)])
    x = rng.standard_normal((n, d)) * spec @ basis.T
    x[:, 3] += 20 * rng.standard_normal(n) * (rng.random(n) < 0.05)
    return x.astype(np.float32)


def test_haar_rotation_is_orthogonal_and_deterministic():
    key = jax.random.PRNGKey(0)
    for n in (1, 7, 56):
        r = np.asarray(resq.haar_rotation(key, n), np.float64)
        np.testing.assert_allclose(r.T @ r, np.eye(n), atol=1e-5)
        np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(resq.haar_rotation(key, 8)), np.asarray(resq.haar_rotation(key, 8))
    )
    assert not np.allclose(resq.haar_rotation(key, 8), resq.haar_rotation(jax.random.PRNGKey(1), 8))


def test_rotation_orthogonal_and_high_subspace_holds_top_eigen_share():
    x = _acts(1).astype(np.float64)
    h = x.T @ x / len(x)
    rot = resq.resq_rotation(h, jax.random.PRNGKey(3))
    assert rot.n_high == D // 8
    u = np.asarray(rot.u, np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(D), atol=1e-5)
    lam = np.linalg.eigvalsh(h)  # ascending, undamped: damping does not move eigenvectors
    xr = x @ u
    var = (xr**2).mean(0)
    share = var[-8:].sum() / var.sum()
    assert share == pytest.approx(lam[-8:].sum() / lam.sum(), rel=1e-5)
    # Within each subspace the rotation spreads the variance (no single dominant coordinate).
    assert var[-8:].max() < 0.5 * var[-8:].sum()
    # Damped eigenvalues, ascending.
    np.testing.assert_allclose(np.asarray(rot.evals), lam + 0.01 * np.mean(np.diag(h)), rtol=1e-5)


def test_rotated_unquantized_output_equals_original():
    x = _acts(2)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, D)).astype(np.float32)
    rot = resq.resq_rotation(x.T @ x / len(x), jax.random.PRNGKey(0))
    y = x.astype(np.float64) @ w.T
    xr = np.asarray(jnp.matmul(x, rot.u, precision=jax.lax.Precision.HIGHEST), np.float64)
    wr = np.asarray(resq.rotate_weight(w, rot.u), np.float64)
    np.testing.assert_allclose(xr @ wr.T, y, rtol=1e-4, atol=1e-3)
    # And through the linear with quantization switched off (w_hat = W R exactly).
    lin = resq.ResQLinear(w_hat=resq.rotate_weight(w, rot.u), rot=rot.u, n_high=8, act_low=None)
    assert isinstance(lin, Linear) and lin.in_features == D and lin.out_features == 24
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), y, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 64, 12, 20, 28, 36, 44, 76, 96, 192])
def test_hadamard_orthogonal(n):
    h = np.asarray(resq.hadamard_matrix(n), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(resq.hadamard_transform(x)), x @ h.T, rtol=1e-4, atol=1e-5
    )


def test_hadamard_factorizations_for_model_widths():
    assert resq.hadamard_factor(14336) == (512, 28)  # Paley II, q = 13
    assert resq.hadamard_factor(11008) == (2, 5504)  # Paley I, q = 5503
    assert resq.hadamard_factor(9728) == (128, 76)  # Paley II, q = 37
    assert resq.hadamard_factor(1536) == (128, 12)  # SmolLM2's intermediate size
    assert resq.hadamard_factor(8192) == (8192, 1)
    with pytest.raises(ValueError, match="no Hadamard construction"):
        resq.hadamard_factor(6 * 11)


def test_mixed_precision_quantizers():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, D)).astype(np.float32)
    wq = np.asarray(resq.mixed_weight_rtn(w, 8))
    lo = F.fake_quant(w[:, :56], resq.W_LOW, int_rule=resq.W_RULE)
    hi = F.fake_quant(w[:, 56:], resq.W_HIGH, int_rule=resq.W_RULE)
    np.testing.assert_array_equal(wq[:, :56], np.asarray(lo))
    np.testing.assert_array_equal(wq[:, 56:], np.asarray(hi))
    # Separate per-token scale/zero per part: each part matches its own asym quantizer.
    x = _acts(6)[:50]
    xq = np.asarray(resq.mixed_act_quant(x, 8))
    lo = x[:, :56].astype(np.float64)
    mn, mx = np.minimum(lo.min(1, keepdims=True), 0), np.maximum(lo.max(1, keepdims=True), 0)
    sc = ((mx - mn) / 15).astype(np.float32)
    z = np.clip(np.rint(-mn / sc), 0, 15)
    want = (np.clip(np.rint(x[:, :56] / sc) + z, 0, 15) - z) * sc
    np.testing.assert_allclose(xq[:, :56], want, rtol=1e-5, atol=1e-6)
    hi_err = np.abs(xq[:, 56:] - x[:, 56:]).max(1)
    lo_err = np.abs(xq[:, :56] - x[:, :56]).max(1)
    rng_hi = np.ptp(x[:, 56:], 1)
    assert np.all(hi_err <= rng_hi / 255 * 0.5 * 1.0001 + 1e-6)  # the 8-bit part
    assert np.median(lo_err / np.ptp(x[:, :56], 1)) > 0.01  # the 4-bit part is coarse


def test_resq_beats_plain_w4a4_and_gptq_helps():
    x = _acts(7)
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((32, D)) * 0.1).astype(np.float32)
    h = x.T @ x / len(x)
    rot = resq.resq_rotation(h, jax.random.PRNGKey(0))
    y = x.astype(np.float64) @ w.T
    lin = resq.resq_quantize(w, rot.u, n_high=rot.n_high)
    e_resq = np.linalg.norm(np.asarray(lin(jnp.asarray(x))) - y)
    xq = np.asarray(F.fake_quant(x, resq.A_LOW))
    e_plain = np.linalg.norm(xq @ np.asarray(F.fake_quant(w, resq.W_LOW)).T - y)
    assert e_resq < 0.5 * e_plain, (e_resq, e_plain)
    lin_g = resq.resq_quantize(w, rot.u, n_high=rot.n_high, h=h, mse_clip=True, act_low=None)
    lin_r = resq.resq_quantize(w, rot.u, n_high=rot.n_high, act_low=None)
    e_g = np.linalg.norm(np.asarray(lin_g(jnp.asarray(x))) - y)
    e_r = np.linalg.norm(np.asarray(lin_r(jnp.asarray(x))) - y)
    assert e_g < e_r


def test_online_hadamard_linear_is_exact_without_quantization():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((10, 12)).astype(np.float32)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    lin = resq.resq_quantize(
        w, hadamard=True, w_low=F.resolve_format("int8", group_size=-1), act_low=None
    )
    y = x.astype(np.float64) @ w.T
    # 8-bit weights only: close to the float output; the Hadamard itself is exact.
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), y, rtol=0.02, atol=0.05)
    hw = np.asarray(resq.hadamard_transform(w), np.float64)
    hx = np.asarray(resq.hadamard_transform(x), np.float64)
    np.testing.assert_allclose(hx @ hw.T, y, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        resq.pca_basis(np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        resq.pca_basis(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="n_high"):
        resq.resq_rotation(np.eye(8), jax.random.PRNGKey(0), n_high=9)
    with pytest.raises(ValueError, match="rot must be"):
        resq.resq_quantize(np.ones((4, 8)), np.eye(4))
    with pytest.raises(ValueError, match="per-row"):
        resq.mixed_weight_rtn(np.ones((4, 8)), 2, low_fmt="int4")
