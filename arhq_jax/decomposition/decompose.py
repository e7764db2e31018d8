"""Low-rank + residual splits of a weight: ARHQ, SVDQuant, smoothing (α search) and layer SNR.

Spec: docs/spec/methods.md §2.2 (ARHQ raw), §2.3 (smoothing), §2.4 (SNR), §3 (SVDQuant as
the ARHQ reference implements it). Every function is pure; matmuls run at ``precision=HIGHEST``;
the f64 path is
``with jax.enable_x64(True):`` around calls made with f64 inputs.

A split is ``W = residual + B Aᵀ`` with ``B [out, r]`` and ``A [in, r]``; at run time
``ŷ = Q_a(x/s)·Q_w(residual)ᵀ + ((x/s)·A)·Bᵀ`` (s ≡ 1 in the raw setting).

**Smoothing is a three-pass streaming flow** over the calibration tokens of one input group:

1. ``stats.update_stats`` with absmax kept → ``m_x`` (per input channel ``max_t |x_ti|``).
2. Per projection, ``init_alpha_search`` then ``update_alpha_search(state, x_chunk, w, m_x,
   w_fmt, act_fmt)`` on every chunk (all 21 α = k/20 at once) → ``select_alpha`` → α*, and
   ``s = smooth_scales(m_x, weight_absmax(w), α*)``.
3. ``stats.update_stats`` again on ``x / s`` → ``G_s`` (Q_a is nonlinear, so G_s is *not*
   S⁻¹GS⁻¹), then ``arhq(w * s, G_s, r)`` (or ``svdquant(w * s, r)``). The branch can absorb 1/s
   as ``A' = A / s[:, None]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arhq_jax.numerics.elements import HIGHEST
from arhq_jax.numerics.formats import fake_quant, nvfp4_tensor_scale, resolve_format

# α grid of the reference: k/20 for k = 0..20.
ALPHAS = tuple(k / 20 for k in range(21))
# Floor of m_x and m_w before the powers (docs/spec/methods.md §2.3 step 1).
SCALE_FLOOR = 1e-12
# Relative tolerance of the symmetry check on G: max|G - Gᵀ| <= tol * max|G|.
SYMMETRY_RTOL = 1e-4


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


@struct.dataclass
class LowRankSplit:
    """``W = residual + b @ a.T``.

    Attributes:
      b: ``[out, r]``, the storage dtype (the singular values are folded into B).
      a: ``[in, r]``, the storage dtype.
      residual: ``[out, in]`` in the compute dtype (f32, or f64), recomputed from the stored b, a.
      objective: scalar, ``Σ_{i>r} σ_i(M)²`` (ARHQ: M = W G̃½; SVDQuant: M = W).
      n_clamped: int32 scalar, eigenvalues of G raised to the floor (0 for SVDQuant).
      max_abs_a: scalar, ``max |A|``.
      branch_rel_norm: scalar, ``‖B Aᵀ‖_F / ‖W‖_F``.
    """

    b: jax.Array
    a: jax.Array
    residual: jax.Array
    objective: jax.Array
    n_clamped: jax.Array
    max_abs_a: jax.Array
    branch_rel_norm: jax.Array

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    def branch(self) -> jax.Array:
        """``B Aᵀ`` ``[out, in]`` in the residual's dtype."""
        cd = self.residual.dtype
        return _mm(self.b.astype(cd), self.a.astype(cd).T)


# ----------------------------------------------------------------------------- validation


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _compute_dtype(*xs):
    for x in xs:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"expected a floating-point array, got dtype {x.dtype}")
    return jnp.result_type(*[x.dtype for x in xs], jnp.float32)


def _check_ranks(rank, ranks, w_shape) -> tuple[int, ...]:
    if (rank is None) == (ranks is None):
        raise ValueError("give exactly one of rank= and ranks=")
    rs = (rank,) if ranks is None else tuple(ranks)
    if not rs:
        raise ValueError("ranks is empty")
    k = min(w_shape)
    for r in rs:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise ValueError(f"rank must be an int, got {r!r}")
        if r < 0 or r > k:
            raise ValueError(f"rank {r} out of range [0, min(out, in) = {k}] for W of {w_shape}")
    return tuple(int(r) for r in rs)


def _check_w(w) -> None:
    if w.ndim != 2:
        raise ValueError(f"W must be [out, in], got shape {w.shape}")
    if not _is_traced(w) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("W contains NaN or Inf")


def _check_g(g, d_in: int) -> None:
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"G must be square [in, in], got shape {g.shape}")
    if g.shape[0] != d_in:
        raise ValueError(f"G is {g.shape} but W has in = {d_in}; G must be [{d_in}, {d_in}]")
    if _is_traced(g):
        return
    if not bool(jnp.all(jnp.isfinite(g))):
        raise ValueError("G contains NaN or Inf")
    asym = float(jnp.max(jnp.abs(g - g.T))) if g.size else 0.0
    scale = float(jnp.max(jnp.abs(g))) if g.size else 0.0
    if asym > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"G is not symmetric: max|G - Gᵀ| = {asym:.3g} > {SYMMETRY_RTOL:g} * max|G| = "
            f"{SYMMETRY_RTOL * scale:.3g}"
        )


# ----------------------------------------------------------------------------- ARHQ / SVDQuant


SOLVERS = ("gram", "eigh")


@struct.dataclass
class GFactor:
    """What every projection reading one G needs of it (``factor_g``): one factorization per G.

    Attributes:
      g: ``[in, in]`` the clamped metric G̃ (G itself when no eigenvalue is below the floor).
      root: ``[in, in]`` R with ``R Rᵀ = G̃`` (lower Cholesky factor, or ``U diag(√λ̃)``), or None
        when built with ``root=False`` (enough for W with out <= in).
      inv_t: ``[in, in]`` ``R⁻ᵀ`` (None with root), so that ``A = R⁻ᵀ V``.
      n_clamped: int32 scalar, eigenvalues raised to the floor.
      eps, rel_eps: the floors it was built with (static).
    """

    g: jax.Array
    root: jax.Array | None
    inv_t: jax.Array | None
    n_clamped: jax.Array
    eps: float = struct.field(pytree_node=False, default=1e-6)
    rel_eps: float = struct.field(pytree_node=False, default=0.0)


@functools.partial(jax.jit, static_argnames=("need_root",))
def _factor_g(g, eps, rel_eps, need_root: bool):
    """G̃, a root R (R Rᵀ = G̃) and R⁻ᵀ, the count of clamped eigenvalues.

    A Cholesky factorization of ``G − ε I`` succeeds exactly when every eigenvalue exceeds the
    floor ε (up to rounding): then G̃ = G and its Cholesky factor is the root, with no eigh.
    Otherwise (or with a relative floor, which needs λ_max) the reference's eigh clamp runs.
    """
    g = 0.5 * (g + g.T)
    d = g.shape[0]
    eye = jnp.eye(d, dtype=g.dtype)

    def clamped(_):
        lam, u = jnp.linalg.eigh(g)  # ascending
        floor = jnp.maximum(eps, rel_eps * lam[-1])
        n = jnp.sum(lam < floor).astype(jnp.int32)
        lt = jnp.maximum(lam, floor)
        gt = _mm(u * lt, u.T)
        gt = 0.5 * (gt + gt.T)
        if not need_root:
            return gt, n
        root = jnp.sqrt(lt)
        return gt, n, u * root, u / root  # R = U diag(√λ̃), R⁻ᵀ = U diag(1/√λ̃)

    def plain(_):
        zero = jnp.zeros((), jnp.int32)
        if not need_root:
            return g, zero
        low = jnp.linalg.cholesky(g)
        inv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)  # L⁻¹
        return g, zero, low, inv.T

    ok = jnp.all(jnp.isfinite(jnp.linalg.cholesky(g - eps * eye))) & (rel_eps == 0)
    return jax.lax.cond(ok, plain, clamped, None)


def factor_g(g, eps: float = 1e-6, rel_eps: float | None = None, *, root: bool = True) -> GFactor:
    """Factor the ARHQ metric once for every projection that reads it (q/k/v share one G,
    gate/up another): ``arhq(w, factor_g(g), r)`` equals ``arhq(w, g, r)``.

    Args:
      g: ``[in, in]`` symmetric PSD (f32, or f64 under x64).
      eps, rel_eps: the eigenvalue floors of ``arhq``.
      root: also build R and R⁻ᵀ (needed by W with out > in, e.g. gate/up); False saves a
        Cholesky factorization and a triangular inverse.
    """
    g = jnp.asarray(g)
    _check_g(g, g.shape[-1] if g.ndim == 2 else -1)
    _check_eps(eps, rel_eps)
    cd = _compute_dtype(g)
    rel = 0.0 if rel_eps is None else float(rel_eps)
    out = _factor_g(g.astype(cd), jnp.asarray(eps, cd), jnp.asarray(rel, cd), need_root=root)
    gt, n = out[:2]
    r, it = out[2:] if root else (None, None)
    return GFactor(gt, r, it, n, eps=float(eps), rel_eps=rel)


def _tail(s2):
    """``tail[r] = Σ_{i>=r} s2[i]`` for r = 0..k (s2 descending), summed smallest first."""
    t = jnp.cumsum(s2[::-1])[::-1]
    return jnp.concatenate([t, jnp.zeros((1,), s2.dtype)])


@functools.partial(jax.jit, static_argnames=("rmax",))
def _gram_factors(w, gt, root, inv_t, rmax: int):
    """The top ``rmax`` ARHQ factors from the eigendecomposition of the smaller Gram of
    M = W R (R Rᵀ = G̃), with no SVD.

    out <= in: ``K = M Mᵀ = W G̃ Wᵀ`` needs no root; ``U_r`` are M's top left singular vectors,
    ``B = U_r Σ_r`` and ``A = Wᵀ U_r Σ_r⁻¹`` (= G̃⁻½ V_r exactly: the branch is ``U_r U_rᵀ W``).
    out > in: ``K = Mᵀ M``, ``V_r`` its top eigenvectors, ``B = M V_r`` (= U_r Σ_r) and
    ``A = R⁻ᵀ V_r``. Returns (B ``[out, rmax]``, A ``[in, rmax]``, tail ``[k + 1]``).
    """
    out, d = w.shape
    if out <= d:
        k = _mm(_mm(w, gt), w.T)
    else:
        m = _mm(w, root)
        k = _mm(m.T, m)
    lam, vec = jnp.linalg.eigh(0.5 * (k + k.T))
    s2 = jnp.maximum(lam[::-1], 0.0)  # descending σ_i²
    vr = vec[:, ::-1][:, :rmax]
    if out <= d:
        sr = jnp.sqrt(s2[:rmax])
        b = vr * sr
        # σ = 0 (rank-deficient M): W ᵀu = 0 in the G̃ metric, the column pair adds nothing.
        a = _mm(w.T, vr) / jnp.where(sr > 0, sr, 1.0)
    else:
        b = _mm(m, vr)
        a = _mm(inv_t, vr)
    return b, a, _tail(s2)


@jax.jit
def _arhq_factor(w, g, eps, rel_eps):
    """The reference: one eigh and one SVD (docs/spec/methods.md §2.2 steps 1–4), every rank."""
    g = 0.5 * (g + g.T)
    lam, u = jnp.linalg.eigh(g)  # ascending
    floor = jnp.maximum(eps, rel_eps * lam[-1])
    n_clamped = jnp.sum(lam < floor).astype(jnp.int32)
    root = jnp.sqrt(jnp.maximum(lam, floor))
    # Both roots explicitly, as the reference does (not U diag Uᵀ applied lazily to V_r).
    g_half = _mm(u * root, u.T)
    g_inv_half = _mm(u / root, u.T)
    um, s, vt = jnp.linalg.svd(_mm(w, g_half), full_matrices=False)
    b = um * s
    a = _mm(g_inv_half, vt.T)
    return b, a, _tail(jnp.square(s)), n_clamped


@functools.partial(jax.jit, static_argnames=("r", "storage"))
def _finish(w, b_all, a_all, tail, n_clamped, r: int, storage):
    """The rank-r split from the leading factor columns; the residual from the stored factors."""
    cd = w.dtype
    b, a = b_all[:, :r], a_all[:, :r]
    if storage is not None:
        b, a = b.astype(storage), a.astype(storage)
    # Recompute the residual from the stored factors so their rounding lands in W_res.
    branch = _mm(b.astype(cd), a.astype(cd).T)
    residual = w - branch
    w_norm = jnp.linalg.norm(w)
    rel = jnp.linalg.norm(branch) / jnp.maximum(w_norm, jnp.finfo(cd).tiny)
    max_a = jnp.max(jnp.abs(a.astype(cd)), initial=0.0)
    return LowRankSplit(b, a, residual, tail[r], n_clamped, max_a, rel)


def _storage(dtype):
    return None if dtype is None else jnp.dtype(dtype)


def _check_eps(eps, rel_eps) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if rel_eps is not None and not rel_eps >= 0:
        raise ValueError(f"rel_eps must be >= 0 or None, got {rel_eps}")


def arhq(
    w,
    g,
    rank: int | None = None,
    eps: float = 1e-6,
    rel_eps: float | None = None,
    *,
    ranks=None,
    dtype=None,
    solver: str = "gram",
):
    """ARHQ split of ``w`` under the activation-residual metric ``g`` (docs/spec/methods.md §2.2).

    Minimises ``‖(W − L) G̃½‖_F²`` over rank-≤r L: with ``λ, U = eigh(sym(G))``,
    ``λ̃ = max(λ, ε, ε_rel·λ_max)``, ``M = W G̃½ = U_m Σ V_mᵀ``: ``B = U_m[:, :r] Σ[:r]``,
    ``A = G̃⁻½ V_m[:, :r]``, ``residual = W − B Aᵀ``, ``objective = Σ_{i>r} σ_i²``.

    Two solvers give this split (the same in exact arithmetic, see
    tests/decomposition/test_decompose.py for
    the measured agreement):

    - ``"gram"`` (default): G̃ = G and its Cholesky factor when no eigenvalue is below the floor
      (checked by a Cholesky factorization of G − εI), else the reference's eigh clamp; then
      the top-r eigenvectors of the smaller Gram matrix of ``M = W R`` (``W G̃ Wᵀ`` when
      out <= in, ``Rᵀ Wᵀ W R`` otherwise) instead of the SVD of M. Any square root R of G̃ gives
      the same optimum.
    - ``"eigh"``: the reference's steps literally (eigh, both roots G̃±½, thin SVD of W G̃½).

    Args:
      w: ``[out, in]`` float (bf16 is upcast; the compute dtype is f32, or f64 under x64 when w or
        g is f64).
      g: ``[in, in]`` symmetric PSD, e.g. ``stats.finalize(...)["G"]``, or a ``GFactor`` from
        ``factor_g`` (one factorization shared by the projections reading the same G; its eps
        and rel_eps must equal these).
      rank: r with ``0 <= r <= min(out, in)``; give this or ``ranks``.
      eps: absolute eigenvalue floor ε (> 0); no diagonal damping.
      rel_eps: optional relative floor ε_rel (>= 0), times the largest eigenvalue.
      ranks: a sequence of ranks; one factorization serves them all.
      dtype: storage dtype of B and A (e.g. the model's bf16); the residual is recomputed from the
        cast factors. None keeps the compute dtype.
      solver: ``"gram"`` or ``"eigh"``.

    Returns:
      A ``LowRankSplit``, or ``{rank: LowRankSplit}`` when ``ranks`` is given.

    Raises:
      ValueError: bad rank, shapes that disagree, G not square/symmetric, NaN/Inf (eager only),
        eps <= 0 or rel_eps < 0, an unknown solver, a GFactor built with other floors or
        without the root W needs.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    w = jnp.asarray(w)
    _check_w(w)
    _check_eps(eps, rel_eps)
    rel = 0.0 if rel_eps is None else float(rel_eps)
    fac = g if isinstance(g, GFactor) else None
    if fac is not None:
        if solver != "gram":
            raise ValueError('a GFactor is used by solver="gram" only')
        if (fac.eps, fac.rel_eps) != (float(eps), rel):
            raise ValueError(
                f"the GFactor was built with eps={fac.eps}, rel_eps={fac.rel_eps}; "
                f"arhq was called with eps={eps}, rel_eps={rel}"
            )
        g = fac.g
    g = jnp.asarray(g)
    if fac is None:
        _check_g(g, w.shape[1])
    elif g.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"the GFactor is for in = {g.shape[0]} but W has in = {w.shape[1]}")
    rs = _check_ranks(rank, ranks, w.shape)
    cd = _compute_dtype(w, g)
    w = w.astype(cd)
    rmax = max(rs)
    if solver == "eigh":
        b, a, tail, n_cl = _arhq_factor(w, g.astype(cd), jnp.asarray(eps, cd), jnp.asarray(rel, cd))
    else:
        out_gt_in = w.shape[0] > w.shape[1]
        if fac is None:
            fac = factor_g(g.astype(cd), eps, rel_eps, root=out_gt_in)
        if out_gt_in and fac.root is None:
            raise ValueError("W has out > in: its GFactor needs root=True")
        root = None if fac.root is None else fac.root.astype(cd)
        inv_t = None if fac.inv_t is None else fac.inv_t.astype(cd)
        b, a, tail = _gram_factors(w, fac.g.astype(cd), root, inv_t, rmax=rmax)
        n_cl = fac.n_clamped
    st = _storage(dtype)
    out = {r: _finish(w, b, a, tail, n_cl, r=r, storage=st) for r in rs}
    return out if ranks is not None else out[rs[0]]


@jax.jit
def _svd(w):
    return jnp.linalg.svd(w, full_matrices=False)


def svdquant(w, rank: int | None = None, *, ranks=None, dtype=None):
    """SVDQuant split as the ARHQ reference implements it (docs/spec/methods.md §3): the plain
    truncated
    SVD of ``w`` (pass ``W diag(s)`` for the smooth setting), ``B = U_r Σ_r``, ``A = V_r``.

    ``objective`` is ``Σ_{i>r} σ_i(W)²`` (the unweighted Frobenius error); ``n_clamped`` is 0.
    Arguments and errors as in ``arhq``.
    """
    w = jnp.asarray(w)
    _check_w(w)
    rs = _check_ranks(rank, ranks, w.shape)
    w = w.astype(_compute_dtype(w))
    um, s, vt = _svd(w)
    st = _storage(dtype)
    zero = jnp.zeros((), jnp.int32)
    b, a, tail = um * s, vt.T, _tail(jnp.square(s))
    out = {r: _finish(w, b, a, tail, zero, r=r, storage=st) for r in rs}
    return out if ranks is not None else out[rs[0]]


# ----------------------------------------------------------------------------- smoothing


def weight_absmax(w) -> jax.Array:
    """``m_w[i] = max_o |W_oi|`` ``[in]`` for ``W [out, in]``."""
    return jnp.max(jnp.abs(jnp.asarray(w)), axis=0)


def smooth_scales(m_x, m_w, alpha) -> jax.Array:
    """``s = max(m_x, 1e-12)^α / max(m_w, 1e-12)^(1−α)`` ``[in]``, no normalisation.

    α = 0 gives ``1/m_w`` (not the identity). Smoothed operands are ``x / s`` and ``W * s``.
    """
    m_x, m_w = jnp.asarray(m_x), jnp.asarray(m_w)
    cd = _compute_dtype(m_x, m_w)
    m_x = jnp.maximum(m_x.astype(cd), SCALE_FLOOR)
    m_w = jnp.maximum(m_w.astype(cd), SCALE_FLOOR)
    alpha = jnp.asarray(alpha, cd)
    return jnp.power(m_x, alpha) / jnp.power(m_w, 1.0 - alpha)


@struct.dataclass
class AlphaSearch:
    """Streaming α-search state: ``errors [21]`` (Σ_t squared output error per α of ``ALPHAS``)
    and ``count`` (int32 tokens seen)."""

    errors: jax.Array
    count: jax.Array


def init_alpha_search(dtype=jnp.float32) -> AlphaSearch:
    """An empty accumulator; ``dtype`` f64 needs ``jax.enable_x64(True)``."""
    return AlphaSearch(jnp.zeros(len(ALPHAS), dtype), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("w_fmt", "act_fmt", "static_act"))
def _alpha_update(state, x, w, m_x, mask, act_tensor_scale, w_fmt, act_fmt, static_act=False):
    d = w.shape[1]
    x = x.reshape(-1, d).astype(jnp.float32)
    if mask is not None:
        # Zero rows give zero error and never raise a dynamic tensor scale.
        x = jnp.where(mask.reshape(-1, 1), x, 0.0)
    w, m_x = w.astype(jnp.float32), m_x.astype(jnp.float32)
    y = _mm(x, w.T)
    m_w = weight_absmax(w)

    def err(alpha):
        s = smooth_scales(m_x, m_w, alpha)
        xs = x / s
        ts = act_tensor_scale
        if static_act:  # the static scale of x/s_α over the calibration set: amax = max m_x/s_α
            ts = nvfp4_tensor_scale(m_x / s)
        xq = xs if act_fmt is None else fake_quant(xs, act_fmt, tensor_scale=ts)
        wq = fake_quant(w * s, w_fmt)
        diff = _mm(xq, wq.T) - y
        return jnp.sum(jnp.square(diff))

    # lax.map keeps one quantized copy of W alive at a time (21 at once would not fit for FFNs).
    errs = jax.lax.map(err, jnp.asarray(ALPHAS, jnp.float32))
    n = x.shape[0] if mask is None else jnp.sum(mask)
    return AlphaSearch(state.errors + errs.astype(state.errors.dtype), state.count + n)


def update_alpha_search(
    state: AlphaSearch,
    x_chunk,
    w,
    m_x,
    w_fmt,
    act_fmt,
    *,
    mask=None,
    act_tensor_scale=None,
    static_act_scale: bool = False,
    weight_1d: bool = True,
) -> AlphaSearch:
    """Add one chunk's ``err(α) = Σ_t ‖Q1d(x_t/s_α)·Q1d(W diag s_α)ᵀ − x_t Wᵀ‖²`` for all 21 α.

    Reference parity: the weight quantizer runs in 1-D blocks along ``in`` even when ``w_fmt``
    asks for 16×16 tiles (``weight_1d=False`` keeps the tiles), and the objective has no low-rank
    branch.

    Args:
      state: from ``init_alpha_search`` or a previous update.
      x_chunk: ``[..., in]`` tokens of the original (unsmoothed) space; chunks of 2,048 tokens in
        the reference (a dynamic ``nvfp4`` activation tensor scale is taken over the chunk).
      w: ``[out, in]``; m_x: ``[in]`` absmax of the calibration tokens (pass 1).
      w_fmt, act_fmt: format names or ``FormatSpec`` (static); ``act_fmt=None`` skips Q_a.
      mask: optional boolean ``x_chunk.shape[:-1]``; False tokens contribute nothing.
      act_tensor_scale: optional fixed activation tensor scale (``nvfp4``), in the activation
        format's convention (``formats.nvfp4_tensor_scale`` of a calibrated amax).
      static_act_scale: ``nvfp4`` activations only: quantize x/s_α with the static scale of its
        calibration amax, ``nvfp4_tensor_scale(m_x / s_α)`` (what the runtime will use), not
        the dynamic scale of the chunk.
    """
    x_chunk, w, m_x = jnp.asarray(x_chunk), jnp.asarray(w), jnp.asarray(m_x)
    if w.ndim != 2 or x_chunk.ndim < 1 or x_chunk.shape[-1] != w.shape[1]:
        raise ValueError(f"x_chunk {x_chunk.shape} and W {w.shape} disagree on in")
    if m_x.shape != (w.shape[1],):
        raise ValueError(f"m_x must be [{w.shape[1]}], got {m_x.shape}")
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.shape != x_chunk.shape[:-1]:
            raise ValueError(
                f"mask {mask.shape} must be x_chunk's leading shape {x_chunk.shape[:-1]}"
            )
    w_spec = resolve_format(w_fmt)
    if weight_1d and w_spec.tile is not None:
        w_spec = resolve_format(w_spec, tile=None)
    a_spec = None if act_fmt is None else resolve_format(act_fmt)
    static_act = bool(static_act_scale) and a_spec is not None and a_spec.name == "nvfp4"
    if static_act and act_tensor_scale is not None:
        raise ValueError("give act_tensor_scale or static_act_scale, not both")
    return _alpha_update(
        state,
        x_chunk,
        w,
        m_x,
        mask,
        act_tensor_scale,
        w_fmt=w_spec,
        act_fmt=a_spec,
        static_act=static_act,
    )


def select_alpha(errors) -> float:
    """α* = ``ALPHAS[argmin errors]``, the first minimum winning. Accepts an ``AlphaSearch``."""
    if isinstance(errors, AlphaSearch):
        errors = errors.errors
    e = np.asarray(errors, np.float64)
    if e.shape != (len(ALPHAS),):
        raise ValueError(f"errors must be [{len(ALPHAS)}], got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError("alpha-search errors contain NaN or Inf")
    return ALPHAS[int(np.argmin(e))]


# ----------------------------------------------------------------------------- SNR


def snr_db(y, y_hat) -> jax.Array:
    """``20·log10(‖y‖_F / max(‖ŷ − y‖_F, 1e−12))`` in dB over the whole block (f32 or f64)."""
    y, y_hat = jnp.asarray(y), jnp.asarray(y_hat)
    if y.shape != y_hat.shape:
        raise ValueError(f"y {y.shape} and y_hat {y_hat.shape} differ in shape")
    cd = _compute_dtype(y, y_hat)
    y, y_hat = y.astype(cd), y_hat.astype(cd)
    err = jnp.maximum(jnp.linalg.norm(y_hat - y), 1e-12)
    return 20.0 * jnp.log10(jnp.linalg.norm(y) / err)


class GFactorCache:
    """``factor_g`` once per distinct G (by identity) for the projections of one layer: q/k/v
    read one G and gate/up another. ``cache(g, w_shape)`` → a ``GFactor`` with the root when
    some W of that G has out > in (refactored with the root if a later W needs it)."""

    def __init__(self, eps: float = 1e-6, rel_eps: float | None = None):
        self.eps, self.rel_eps = eps, rel_eps
        self._by_id: dict[int, tuple[object, GFactor]] = {}

    def __call__(self, g, w_shape) -> GFactor:
        need_root = w_shape[0] > w_shape[1]
        hit = self._by_id.get(id(g))
        if hit is None or (need_root and hit[1].root is None):
            # g is kept in the entry so that its id is not reused while cached
            hit = (g, factor_g(g, self.eps, self.rel_eps, root=need_root))
            self._by_id[id(g)] = hit
        return hit[1]
