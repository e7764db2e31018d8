"""Joint refinement (arhq_jax.decomposition.refine) against numpy float64 evaluations of
E‖X Wᵀ − Q(X) deq(W_res)ᵀ − X A Bᵀ‖²."""

import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.decomposition import decompose, refine
from arhq_jax.numerics.formats import fake_quant


def _data(seed=0, n=512, d=32, out=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(0.8 * rng.standard_normal(d))  # outlier channels
    w = rng.standard_normal((out, d))
    xq = np.asarray(fake_quant(jnp.asarray(x, jnp.float32), "nvfp4"), np.float64)
    return x.astype(np.float32).astype(np.float64), xq, w.astype(np.float32).astype(np.float64)


def _moments(x):
    m = refine.init_moments(x.shape[1])
    for chunk in np.array_split(x, 3):  # streamed in chunks; static act scale = that of all of x
        ts = jnp.float32(2688.0 / np.abs(x).max())
        m = refine.update_moments(m, jnp.asarray(chunk, jnp.float32), "nvfp4", None, ts)
    return refine.finalize_moments(m)


def _j64(x, xq, w, r, b, a):
    y = x @ w.T - xq @ r.T - x @ (b @ a.T).T
    return (y**2).sum() / len(x)


def test_moments_and_objective_match_float64():
    x, _, w = _data()
    ts = 2688.0 / np.abs(x).max()
    xq = np.asarray(fake_quant(jnp.asarray(x, jnp.float32), "nvfp4", tensor_scale=ts), np.float64)
    mom = _moments(x)
    e = x - xq
    np.testing.assert_allclose(np.asarray(mom["H"]), x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mom["C"]), x.T @ e / len(x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mom["G"]), e.T @ e / len(x), rtol=1e-4, atol=1e-7)
    rng = np.random.default_rng(5)
    b, a = rng.standard_normal((24, 4)), rng.standard_normal((32, 4)) * 0.1
    r = np.asarray(fake_quant(jnp.asarray(w - b @ a.T, jnp.float32), "nvfp4"), np.float64)
    got = float(refine.objective(w, r, b, a, mom["H"], mom["C"], mom["G"]))
    np.testing.assert_allclose(got, _j64(x, xq, w, r, b, a), rtol=2e-4)


def test_branch_step_is_the_exact_minimiser_for_fixed_residual():
    # With R fixed, J(L) = ‖(T − L) H½‖² + const, T = W − R + R Cᵀ H⁻¹: at full rank L = T, and
    # at rank r the float64 weighted Eckart–Young solution.
    x, _, w = _data(1, d=16, out=16)
    mom = _moments(x)
    h, c = (np.asarray(mom[k], np.float64) for k in ("H", "C"))
    rng = np.random.default_rng(2)
    r = np.asarray(fake_quant(jnp.asarray(rng.standard_normal((16, 16)), jnp.float32), "nvfp4"))
    r = r.astype(np.float64)
    hh, hih = refine.h_roots(mom, eps=0.0, rel_eps=0.0)
    t = w - r + r @ c.T @ np.linalg.inv(h)
    lam, u = np.linalg.eigh(h)
    h_half, h_ih = (u * np.sqrt(lam)) @ u.T, (u / np.sqrt(lam)) @ u.T
    for rank in (16, 5):
        b, a = refine.branch_step(w, r, mom["C"], hh, hih, rank=rank)
        got = np.asarray(b, np.float64) @ np.asarray(a, np.float64).T
        um, s, vt = np.linalg.svd(t @ h_half)
        want = (um[:, :rank] * s[:rank]) @ vt[:rank] @ h_ih
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_refine_objective_monotone_and_exact(dtype):
    x, xq_dyn, w = _data(3)
    ts = 2688.0 / np.abs(x).max()
    xq = np.asarray(fake_quant(jnp.asarray(x, jnp.float32), "nvfp4", tensor_scale=ts), np.float64)
    mom = _moments(x)
    start = decompose.arhq(w, mom["G"], 4, dtype=dtype)
    out = refine.refine(w, start.b, start.a, mom, refine.rtn_quantizer("nvfp4"), 8)
    objs = out.objectives
    assert len(objs) >= 2, "no iteration improved on ARHQ's split"
    assert all(b < a for a, b in zip(objs, objs[1:], strict=False))
    b, a = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (out.b, out.a))
    r = np.asarray(fake_quant(jnp.asarray(out.residual, jnp.float32), "nvfp4"), np.float64)
    np.testing.assert_allclose(objs[-1], _j64(x, xq, w, r, b, a), rtol=1e-3)
    b0, a0 = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (start.b, start.a))
    r0 = np.asarray(fake_quant(jnp.asarray(w - b0 @ a0.T, jnp.float32), "nvfp4"), np.float64)
    np.testing.assert_allclose(objs[0], _j64(x, xq, w, r0, b0, a0), rtol=1e-3)
    assert _j64(x, xq, w, r, b, a) < _j64(x, xq, w, r0, b0, a0)
    assert out.b.dtype == dtype and out.b.shape == (24, 4)
    np.testing.assert_allclose(np.asarray(out.residual), w - b @ a.T, rtol=1e-5, atol=1e-5)


def test_refine_zero_iterations_and_errors():
    x, _, w = _data(4)
    mom = _moments(x)
    s = decompose.arhq(w, mom["G"], 2)
    out = refine.refine(w, s.b, s.a, mom, refine.rtn_quantizer("nvfp4"), 0)
    assert len(out.objectives) == 1
    with pytest.raises(ValueError, match="iters"):
        refine.refine(w, s.b, s.a, mom, refine.rtn_quantizer("nvfp4"), -1)
    with pytest.raises(ValueError, match="moments"):
        refine.refine(w[:, :8], s.b, s.a[:8], mom, refine.rtn_quantizer("nvfp4"), 1)


def test_act_aware_map_completes_the_square_against_float64():
    # J_λ(R) = J(L, R) + λ‖R − M‖² = ‖(R − T)(Ĥ + λI)½‖² + const with T = M P: the difference of
    # J_λ between two residuals matches the quadratic form, and T is J_λ's minimiser.
    x, xq_dyn, w = _data(4)
    ts = 2688.0 / np.abs(x).max()
    xq = np.asarray(fake_quant(jnp.asarray(x, jnp.float32), "nvfp4", tensor_scale=ts), np.float64)
    mom = _moments(x)
    rng = np.random.default_rng(6)
    b, a = rng.standard_normal((24, 4)), rng.standard_normal((32, 4)) * 0.1
    m = w - b @ a.T
    lam = refine.act_aware_lambda(mom, 0.01)
    p, hh = (
        np.asarray(v, np.float64) for v in refine.act_aware_map(mom["H"], mom["C"], mom["G"], lam)
    )
    np.testing.assert_allclose(hh, xq.T @ xq / len(x), rtol=1e-3, atol=1e-4 * np.abs(hh).max())
    t = m @ p

    def j_lam(r):
        return _j64(x, xq, w, r, b, a) + lam * ((r - m) ** 2).sum()

    def quad(r):
        d = r - t
        return np.sum((d @ (hh + lam * np.eye(len(hh)))) * d)

    r1 = np.asarray(fake_quant(jnp.asarray(m, jnp.float32), "nvfp4"), np.float64)
    r2 = np.asarray(fake_quant(jnp.asarray(t, jnp.float32), "nvfp4"), np.float64)
    np.testing.assert_allclose(j_lam(r1) - j_lam(r2), quad(r1) - quad(r2), rtol=2e-3)
    for _ in range(5):  # T minimises J_λ: any perturbation raises it
        assert j_lam(t + 1e-2 * rng.standard_normal(t.shape)) > j_lam(t)
    # Quantizing the target rather than M lowers the deployed error J on this outlier data.
    assert _j64(x, xq, w, r2, b, a) < _j64(x, xq, w, r1, b, a)


def test_weight_only_moments_and_refinement_against_float64():
    """act_fmt=None: E = 0, so C = G = 0 and J = E‖x (W − R − BAᵀ)ᵀ‖² (the W4A16 output error,
    X in place of Q(X)); the refinement lowers it, starting from the plain SVD branch."""
    x, _, w = _data(5)
    m = refine.init_moments(x.shape[1])
    for chunk in np.array_split(x, 3):
        m = refine.update_moments(m, jnp.asarray(chunk, jnp.float32), None)
    mom = refine.finalize_moments(m)
    assert not np.asarray(mom["C"]).any() and not np.asarray(mom["G"]).any()
    np.testing.assert_allclose(np.asarray(mom["H"]), x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    start = decompose.svdquant(w, 4)
    out = refine.refine(w, start.b, start.a, mom, refine.rtn_quantizer("nvfp4"), 6)
    objs = out.objectives
    assert len(objs) >= 2 and all(b < a for a, b in zip(objs, objs[1:], strict=False))
    b, a = (np.asarray(t, np.float64) for t in (out.b, out.a))
    r = np.asarray(fake_quant(jnp.asarray(out.residual, jnp.float32), "nvfp4"), np.float64)
    np.testing.assert_allclose(objs[-1], _j64(x, x, w, r, b, a), rtol=1e-3)
    b0, a0 = (np.asarray(t, np.float64) for t in (start.b, start.a))
    r0 = np.asarray(fake_quant(jnp.asarray(w - b0 @ a0.T, jnp.float32), "nvfp4"), np.float64)
    np.testing.assert_allclose(objs[0], _j64(x, x, w, r0, b0, a0), rtol=1e-3)
    assert objs[-1] < 0.9 * objs[0]  # the H-metric branch fits the quantization error
