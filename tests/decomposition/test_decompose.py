"""ARHQ / SVDQuant splits, smoothing α search and SNR against numpy float64 and brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.decomposition import decompose as dec
from arhq_jax.numerics.formats import fake_quant, resolve_format

OUT, IN, N, R = 24, 32, 400, 6


def _problem(seed=0, out=OUT, d=IN, n=N, dead=()):
    """W, E (residual-like, with anisotropic channels) and G = EᵀE/N, all f64 numpy."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, d))
    e = rng.standard_normal((n, d)) * np.exp(rng.normal(0, 1.0, d)) * 0.1
    e[:, list(dead)] = 0.0
    g = e.T @ e / n
    return w, e, g


def _gmetric(w, l, g):
    """‖(W − L) G½‖²_F = tr((W − L) G (W − L)ᵀ) in f64."""
    d = np.asarray(w, np.float64) - np.asarray(l, np.float64)
    return float(np.einsum("oi,ij,oj->", d, np.asarray(g, np.float64), d))


def _branch64(split):
    return np.asarray(split.b, np.float64) @ np.asarray(split.a, np.float64).T


def _np_arhq(w, g, r, eps=1e-6):
    lam, u = np.linalg.eigh(0.5 * (g + g.T))
    lt = np.maximum(lam, eps)
    s = np.linalg.svd(w @ (u * np.sqrt(lt)) @ u.T, compute_uv=False)
    return float(np.sum(s[r:] ** 2)), (u * lt) @ u.T


# ----------------------------------------------------------------------------- ARHQ


def test_arhq_beats_svdquant_and_random_splits():
    w, _, g = _problem(0)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    split = dec.arhq(w32, g32, R)
    j_arhq = _gmetric(w32, _branch64(split), g32)
    j_svd = _gmetric(w32, _branch64(dec.svdquant(w32, R)), g32)
    assert j_arhq < j_svd * (1 - 1e-3)  # anisotropic G: the metric matters
    rng = np.random.default_rng(1)
    b0, a0 = np.asarray(split.b, np.float64), np.asarray(split.a, np.float64)
    for k in range(100):
        if k % 2:  # near the optimum: a perturbed pair of factors
            sc = 10.0 ** rng.uniform(-3, -1)
            b = b0 + sc * rng.standard_normal(b0.shape) * np.abs(b0).mean()
            a = a0 + sc * rng.standard_normal(a0.shape) * np.abs(a0).mean()
            l = b @ a.T
        else:  # W projected on a random rank-r subspace of inputs
            q, _ = np.linalg.qr(rng.standard_normal((IN, R)))
            l = w32 @ q @ q.T
        assert j_arhq <= _gmetric(w32, l, g32) * (1 + 1e-6)


def test_arhq_reconstruction_and_objective():
    w, e, g = _problem(2)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    split = dec.arhq(w32, g32, R)
    assert split.b.shape == (OUT, R) and split.a.shape == (IN, R)
    assert split.residual.shape == (OUT, IN) and split.residual.dtype == jnp.float32
    recon = np.asarray(split.residual, np.float64) + _branch64(split)
    assert np.linalg.norm(recon - w32) <= 1e-5 * np.linalg.norm(w32)
    assert int(split.n_clamped) == 0
    j_np, _ = _np_arhq(w32.astype(np.float64), g32.astype(np.float64), R)
    np.testing.assert_allclose(float(split.objective), j_np, rtol=1e-4)
    l = _branch64(split)
    np.testing.assert_allclose(float(split.objective), _gmetric(w32, l, g32), rtol=1e-4)
    # Nothing clamped: J = (1/N)‖E (W − L)ᵀ‖²_F.
    direct = np.sum((e @ (w32 - l).T) ** 2) / N
    np.testing.assert_allclose(float(split.objective), direct, rtol=1e-4)
    # Diagnostics.
    np.testing.assert_allclose(float(split.max_abs_a), np.abs(np.asarray(split.a)).max(), rtol=1e-6)
    rel = np.linalg.norm(l) / np.linalg.norm(w32)
    np.testing.assert_allclose(float(split.branch_rel_norm), rel, rtol=1e-5)


def test_arhq_f64_matches_numpy():
    w, _, g = _problem(3)
    with jax.enable_x64(True):
        split = dec.arhq(w, g, R)
        assert split.residual.dtype == jnp.float64 and split.b.dtype == jnp.float64
        j_np, _ = _np_arhq(w, g, R)
        np.testing.assert_allclose(float(split.objective), j_np, rtol=1e-10)
        np.testing.assert_allclose(_gmetric(w, _branch64(split), g), j_np, rtol=1e-9)
        recon = np.asarray(split.residual) + _branch64(split)
        np.testing.assert_allclose(recon, w, atol=1e-12)


def test_rank_zero_and_full():
    w, _, g = _problem(4)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    s0 = dec.arhq(w32, g32, 0)
    assert s0.b.shape == (OUT, 0) and s0.a.shape == (IN, 0)
    np.testing.assert_array_equal(np.asarray(s0.residual), w32)
    np.testing.assert_allclose(float(s0.objective), _gmetric(w32, 0, g32), rtol=1e-4)
    assert float(s0.branch_rel_norm) == 0.0
    k = min(OUT, IN)
    sf = dec.arhq(w32, g32, k)
    assert np.linalg.norm(np.asarray(sf.residual)) <= 1e-4 * np.linalg.norm(w32)
    assert float(sf.objective) == 0.0


def test_singular_g_is_clamped():
    dead = (3, 10, 11)
    w, e, g = _problem(5, dead=dead)
    split = dec.arhq(w.astype(np.float32), g.astype(np.float32), R, eps=1e-6)
    assert int(split.n_clamped) == len(dead)
    for leaf in jax.tree_util.tree_leaves(split):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # The clamped objective is the G̃ metric, G̃ = G with its zero eigenvalues raised to ε.
    j_np, g_tilde = _np_arhq(w.astype(np.float32).astype(np.float64), g.astype(np.float32), R)
    np.testing.assert_allclose(float(split.objective), j_np, rtol=1e-4)
    np.testing.assert_allclose(
        _gmetric(w.astype(np.float32), _branch64(split), g_tilde), j_np, rtol=1e-3
    )
    # A relative clamp raises every eigenvalue below rel_eps·λ_max.
    lam = np.linalg.eigvalsh(g)
    rel = 1e-2
    s_rel = dec.arhq(w.astype(np.float32), g.astype(np.float32), R, rel_eps=rel)
    assert int(s_rel.n_clamped) == int(np.sum(lam < rel * lam[-1]))


def test_multi_rank_equals_single_rank():
    w, _, g = _problem(6)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    many = dec.arhq(w32, g32, ranks=(0, 3, R))
    assert sorted(many) == [0, 3, R]
    for r, split in many.items():
        one = dec.arhq(w32, g32, r)
        leaves = zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(one), strict=True)
        for a, b in leaves:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    svd_many = dec.svdquant(w32, ranks=(2, R))
    np.testing.assert_allclose(
        np.asarray(svd_many[R].residual), np.asarray(dec.svdquant(w32, R).residual), atol=1e-6
    )


def test_storage_dtype_residual_from_cast_factors():
    w, _, g = _problem(7)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    split = dec.arhq(w32, g32, R, dtype=jnp.bfloat16)
    assert split.b.dtype == jnp.bfloat16 and split.a.dtype == jnp.bfloat16
    assert split.residual.dtype == jnp.float32
    expect = w32.astype(np.float64) - _branch64(split)
    np.testing.assert_allclose(np.asarray(split.residual), expect, atol=1e-5)
    exact = dec.arhq(w32, g32, R)
    # bf16 factors differ from the f32 ones by their rounding only.
    np.testing.assert_allclose(np.asarray(split.b, np.float32), exact.b, rtol=1e-2, atol=1e-2)


def test_svdquant_is_truncated_svd():
    w, _, _ = _problem(8)
    w32 = w.astype(np.float32)
    split = dec.svdquant(w32, R)
    u, s, vt = np.linalg.svd(w32.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(_branch64(split), (u[:, :R] * s[:R]) @ vt[:R], atol=1e-5)
    np.testing.assert_allclose(float(split.objective), np.sum(s[R:] ** 2), rtol=1e-5)
    # A = V_r has orthonormal columns.
    a = np.asarray(split.a, np.float64)
    np.testing.assert_allclose(a.T @ a, np.eye(R), atol=1e-5)
    assert int(split.n_clamped) == 0


def test_arhq_under_jit():
    w, _, g = _problem(9)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    jitted = jax.jit(lambda w, g: dec.arhq(w, g, R).residual)(w32, g32)
    np.testing.assert_allclose(jitted, dec.arhq(w32, g32, R).residual, atol=1e-5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=-1), "out of range"),
        (dict(rank=OUT + 1), "out of range"),
        (dict(rank=2.0), "must be an int"),
        (dict(rank=None), "exactly one"),
        (dict(rank=2, ranks=(1,)), "exactly one"),
        (dict(rank=None, ranks=(1, 99)), "out of range"),
        (dict(rank=2, eps=0.0), "eps"),
        (dict(rank=2, rel_eps=-1.0), "rel_eps"),
    ],
)
def test_arhq_bad_arguments(kwargs, match):
    w, _, g = _problem(10)
    with pytest.raises(ValueError, match=match):
        dec.arhq(w.astype(np.float32), g.astype(np.float32), **kwargs)


def test_arhq_bad_inputs():
    w, _, g = _problem(11)
    w, g = w.astype(np.float32), g.astype(np.float32)
    with pytest.raises(ValueError, match="W must be"):
        dec.arhq(w[0], g, 1)
    with pytest.raises(ValueError, match="square"):
        dec.arhq(w, g[:, :-1], 1)
    with pytest.raises(ValueError, match="W has in = 31"):
        dec.arhq(w[:, :-1], g, 1)
    asym = g.copy()
    asym[0, 1] += 0.1 * np.abs(g).max()
    with pytest.raises(ValueError, match="not symmetric"):
        dec.arhq(w, asym, 1)
    bad = w.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="W contains NaN"):
        dec.arhq(bad, g, 1)
    with pytest.raises(ValueError, match="W contains NaN"):
        dec.svdquant(bad, 1)
    badg = g.copy()
    badg[1, 1] = np.inf
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        dec.arhq(w, badg, 1)
    with pytest.raises(ValueError, match="floating"):
        dec.arhq(w.astype(np.int32), g, 1)
    # Within the symmetry tolerance: f32 rounding of a Gram matrix is accepted.
    near = g.copy()
    near[0, 1] *= 1 + 1e-6
    dec.arhq(w, near, 1)


# ----------------------------------------------------------------------------- smoothing


def test_smooth_scales_by_hand():
    s = dec.smooth_scales(np.array([4.0, 1e-20, 9.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1e-6 / np.sqrt(2.0), 3.0 / 1e-6], rtol=1e-6)
    s0 = dec.smooth_scales(np.array([4.0, 8.0]), np.array([2.0, 0.5]), 0.0)
    np.testing.assert_allclose(s0, [0.5, 2.0])  # α = 0 is 1/m_w, not the identity
    np.testing.assert_allclose(dec.smooth_scales([4.0], [2.0], 1.0), [4.0])
    np.testing.assert_array_equal(dec.weight_absmax(np.array([[1.0, -3.0], [-2.0, 0.5]])), [2, 3])


def _alpha_bruteforce(x, w, m_x, w_fmt, act_fmt, chunk):
    """The α loop of the reference, one α at a time, numpy f64 sums over chunks."""
    m_w = np.abs(w).max(axis=0)
    errs = []
    for alpha in [k / 20 for k in range(21)]:
        s = np.asarray(dec.smooth_scales(m_x, m_w, alpha))
        wq = np.asarray(fake_quant(jnp.asarray(w * s), w_fmt), np.float64)
        tot = 0.0
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk]
            xq = np.asarray(fake_quant(jnp.asarray(xc / s), act_fmt), np.float64)
            y = xc.astype(np.float64) @ w.astype(np.float64).T
            tot += np.sum((xq @ wq.T - y) ** 2)
        errs.append(tot)
    return np.array(errs)


def test_alpha_search_matches_bruteforce():
    rng = np.random.default_rng(12)
    d, out, n, chunk = 64, 48, 96, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, [5, 40]] *= 30.0  # outlier channels make smoothing matter
    w = (rng.standard_normal((out, d)) * 0.05).astype(np.float32)
    m_x = np.abs(x).max(axis=0)
    fmt = "nvfp4-paper"
    state = dec.init_alpha_search()
    for i in range(0, n, chunk):
        state = dec.update_alpha_search(state, x[i : i + chunk], w, m_x, fmt, fmt)
    ref = _alpha_bruteforce(x, w, m_x, fmt, fmt, chunk)
    np.testing.assert_allclose(np.asarray(state.errors), ref, rtol=1e-4)
    assert int(state.count) == n
    assert dec.select_alpha(state) == dec.ALPHAS[int(np.argmin(ref))]
    assert 0 < int(np.argmin(ref)) < 20  # the search actually moves α
    # Masked (padding) tokens add nothing.
    pad = np.concatenate([x[:chunk], 100.0 * np.ones((8, d), np.float32)])
    mask = np.arange(chunk + 8) < chunk
    masked = dec.update_alpha_search(dec.init_alpha_search(), pad, w, m_x, fmt, fmt, mask=mask)
    plain = dec.update_alpha_search(dec.init_alpha_search(), x[:chunk], w, m_x, fmt, fmt)
    np.testing.assert_allclose(masked.errors, plain.errors, rtol=1e-5)
    assert int(masked.count) == chunk


def test_alpha_search_uses_1d_weight_blocks_for_tiles():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    w = rng.standard_normal((20, 32)).astype(np.float32)
    m_x = np.abs(x).max(axis=0)
    tiled = resolve_format("nvfp4-paper", tile=(16, 16))
    st = dec.init_alpha_search()
    got = dec.update_alpha_search(st, x, w, m_x, tiled, "nvfp4-paper")
    one_d = dec.update_alpha_search(st, x, w, m_x, "nvfp4-paper", "nvfp4-paper")
    np.testing.assert_array_equal(got.errors, one_d.errors)
    kept = dec.update_alpha_search(st, x, w, m_x, tiled, "nvfp4-paper", weight_1d=False)
    assert not np.allclose(kept.errors, one_d.errors)
    ref = _alpha_bruteforce(x, w, m_x, tiled, "nvfp4-paper", 16)
    np.testing.assert_allclose(kept.errors, ref, rtol=1e-4)


def test_select_alpha_first_minimum_and_errors():
    e = np.full(21, 5.0)
    e[[3, 7]] = 1.0
    assert dec.select_alpha(e) == dec.ALPHAS[3] == 0.15
    with pytest.raises(ValueError, match="NaN"):
        dec.select_alpha(np.where(np.arange(21) == 2, np.nan, e))
    with pytest.raises(ValueError, match="must be \\[21\\]"):
        dec.select_alpha(np.ones(20))
    st = dec.init_alpha_search()
    with pytest.raises(ValueError, match="disagree"):
        dec.update_alpha_search(st, np.ones((4, 8)), np.ones((3, 9)), np.ones(9), "int8", "int8")
    with pytest.raises(ValueError, match="m_x"):
        dec.update_alpha_search(st, np.ones((4, 9)), np.ones((3, 9)), np.ones(8), "int8", "int8")
    with pytest.raises(ValueError, match="mask"):
        dec.update_alpha_search(
            st, np.ones((4, 9)), np.ones((3, 9)), np.ones(9), "int8", "int8", mask=np.ones(3)
        )


# ----------------------------------------------------------------------------- SNR


def test_snr_db_by_hand():
    y = np.array([[3.0, 4.0]])
    assert float(dec.snr_db(y, [[3.0, 4.05]])) == pytest.approx(40.0, abs=1e-4)
    assert float(dec.snr_db(y, [[3.0, 9.0]])) == pytest.approx(0.0, abs=1e-6)
    assert float(dec.snr_db(y, y)) == pytest.approx(20 * np.log10(5e12), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        dec.snr_db(y, y.T)


# ----------------------------------------------------------------------------- gram solver


def _np_branch(w, g, r, eps=1e-6):
    """The reference split in numpy f64: eigh clamp, both roots, thin SVD → (B Aᵀ, objective)."""
    lam, u = np.linalg.eigh(0.5 * (g + g.T))
    lt = np.maximum(lam, eps)
    um, s, vt = np.linalg.svd(w @ (u * np.sqrt(lt)) @ u.T, full_matrices=False)
    a = (u / np.sqrt(lt)) @ u.T @ vt[:r].T
    return (um[:, :r] * s[:r]) @ a.T, float(np.sum(s[r:] ** 2))


@pytest.mark.parametrize("out", [12, 40])  # out <= in (W G Wᵀ) and out > in (Rᵀ WᵀW R)
@pytest.mark.parametrize("dead", [(), (3, 17)])  # Cholesky path, then the eigh clamp
def test_gram_solver_equals_reference(out, dead):
    """The default solver against the literal reference (eigh + SVD) in f32 and numpy f64:
    objective within 1e-4 relative, branch within 1e-4 of ‖W‖ (f32), n_clamped equal."""
    w, _, g = _problem(3, out=out, dead=dead)
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    r = 5
    fast = dec.arhq(w32, g32, r)
    ref = dec.arhq(w32, g32, r, solver="eigh")
    br64, j64 = _np_branch(w32.astype(np.float64), g32.astype(np.float64), r)
    assert int(fast.n_clamped) == int(ref.n_clamped) == len(dead)
    wn = np.linalg.norm(w32)
    for s in (fast, ref):
        np.testing.assert_allclose(float(s.objective), j64, rtol=1e-4)
        assert np.linalg.norm(_branch64(s) - br64) <= 1e-4 * wn
        # the objective is what the split achieves, in the clamped metric
        _, gt = _np_arhq(w32.astype(np.float64), g32.astype(np.float64), r)
        np.testing.assert_allclose(_gmetric(w32, _branch64(s), gt), j64, rtol=1e-4)
    # B carries the singular values in both: column norms agree (the columns up to sign)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(fast.b), axis=0),
        np.linalg.norm(np.asarray(ref.b), axis=0),
        rtol=1e-4,
    )


@pytest.mark.parametrize("out", [3, 6])
def test_gram_solver_is_the_brute_force_optimum(out):
    """Tiny shapes: no rank-1 L found by random search beats the gram split in the G metric
    (f64), and it equals the numpy optimum to 1e-10."""
    w, _, g = _problem(5, out=out, d=4, n=50)
    with jax.enable_x64(True):
        s = dec.arhq(w, g, 1)
        j = _gmetric(w, _branch64(s), g)
        _, j64 = _np_branch(w, g, 1)
        np.testing.assert_allclose(j, j64, rtol=1e-10)
        np.testing.assert_allclose(float(s.objective), j64, rtol=1e-10)
        rng = np.random.default_rng(0)
        b, a = np.asarray(s.b), np.asarray(s.a)
        for _ in range(2000):
            bb = b + 0.3 * rng.standard_normal(b.shape)
            aa = a + 0.3 * rng.standard_normal(a.shape)
            assert _gmetric(w, bb @ aa.T, g) >= j * (1 - 1e-12)


def test_gram_f64_and_full_rank():
    w, _, g = _problem(2, out=40)
    with jax.enable_x64(True):
        for r in (0, 7, IN):
            s = dec.arhq(w, g, r)
            br, j = _np_branch(w, g, r)
            np.testing.assert_allclose(_branch64(s), br, atol=1e-9 * np.linalg.norm(w))
            np.testing.assert_allclose(float(s.objective), j, rtol=1e-9, atol=1e-12)


def test_gfactor_shared_equals_per_projection():
    """One factor_g serves q/k/v-like projections of either aspect; the splits equal the
    per-call ones bit for bit (same executables, same inputs)."""
    _, _, g = _problem(4)
    g32 = g.astype(np.float32)
    fac = dec.factor_g(g32)
    rng = np.random.default_rng(0)
    for out in (8, IN, 50):
        w32 = rng.standard_normal((out, IN)).astype(np.float32)
        a, b = dec.arhq(w32, fac, R), dec.arhq(w32, g32, R)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="rel_eps"):
        dec.arhq(w32, fac, R, rel_eps=1e-3)
    with pytest.raises(ValueError, match="root=True"):
        dec.arhq(rng.standard_normal((50, IN)).astype(np.float32), dec.factor_g(g32, root=False), R)
    with pytest.raises(ValueError, match="solver"):
        dec.arhq(w32, g32, R, solver="svd")
    with pytest.raises(ValueError, match="in = 32"):
        dec.arhq(np.ones((4, 8), np.float32), fac, 1)


def test_gram_rel_eps_uses_the_clamp():
    w, _, g = _problem(6, out=40)
    lam = np.linalg.eigh(g.astype(np.float32))[0]
    rel = float(lam[len(lam) // 2] / lam[-1])
    s = dec.arhq(w.astype(np.float32), g.astype(np.float32), R, rel_eps=rel)
    ref = dec.arhq(w.astype(np.float32), g.astype(np.float32), R, rel_eps=rel, solver="eigh")
    assert int(s.n_clamped) == int(ref.n_clamped) > 0
    np.testing.assert_allclose(float(s.objective), float(ref.objective), rtol=1e-4)


def test_gfactor_cache_one_factorization_per_g():
    _, _, g = _problem(7)
    g1, g2 = jnp.asarray(g, jnp.float32), jnp.asarray(g * 2, jnp.float32)
    cache = dec.GFactorCache()
    f1 = cache(g1, (8, IN))
    assert f1.root is None  # out <= in needs no root
    assert cache(g1, (16, IN)) is f1
    f1r = cache(g1, (50, IN))  # out > in: refactored with the root, then reused
    assert f1r.root is not None and cache(g1, (8, IN)) is f1r
    f2 = cache(g2, (8, IN))
    assert f2 is not f1r
    np.testing.assert_allclose(np.asarray(f2.g), 2 * np.asarray(f1r.g), rtol=1e-6)
