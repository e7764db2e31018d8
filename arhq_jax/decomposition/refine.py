"""Joint refinement of the low-rank branch and the quantized residual.

ARHQ's split minimises ``‖(W − L) G̃½‖²``, the output error of the activation quantizer alone; it
ignores the error of quantizing its own residual. Over calibration tokens X (with E = X − Q_a(X))
the error of the deployed linear ``ŷ = Q_a(x)·Rᵀ + x·Lᵀ`` (R = deq(Q_w(W − L)), L = B Aᵀ) is

    J(L, R) = E_t ‖x Wᵀ − Q_a(x) Rᵀ − x Lᵀ‖²
            = tr(D H Dᵀ) + 2 tr(D C Rᵀ) + tr(R G Rᵀ),     D = W − R − L,

with the second moments ``H = XᵀX/N``, ``C = XᵀE/N``, ``G = EᵀE/N`` (``Moments``). It is computed
exactly from these three matrices (``objective``).

**Alternation** (``refine``), from the ARHQ split:

1. quantize the residual, R = deq(Q_w(W − L));
2. with R held fixed, J is ``‖(T − L) H½‖² + const`` with ``T = W − R + R Cᵀ H⁻¹``, minimised
   over rank-r L by ``L = [T H̃½]_r H̃⁻½`` (Eckart–Young in the H metric; H̃ clamps the
   eigenvalues of H at ``max(eps, rel_eps·λ_max)``, so the step is exact where H is not clamped);
3. store B, A in the storage dtype, re-quantize R = deq(Q_w(W − B Aᵀ)) from the stored factors,
   evaluate J exactly; accept when J decreased by more than ``rtol`` (relative), else stop and
   keep the best.

(Holding the quantization error Δ = R − (W − L) fixed instead, as SVDQuant's refinement does,
moves L so much that Δ changes completely and J does not decrease; holding R fixed does.)

**Weight-only** (``act_fmt=None``: Q_a is the identity, E = 0, C = G = 0) the same alternation
minimises ``J = ‖(W − R − L) H½‖²``: each branch step is ``L = [(W − R) H̃½]_r H̃⁻½``, the rank-r
fit of the residual's quantization error in the metric of the input's second moment H, the
branch chosen for weight-only serving (W4A16) instead of ARHQ's G.

**Smoothing.** In the fold setting (``arhq_jax.methods.fold_smoothing``) the layer is folded
before it is calibrated, so W and the moments are those of the smoothed space and the refinement
runs unchanged there.

The recorded objectives of accepted iterates are therefore non-increasing; the refinement can
only improve on its starting split under J. The residual quantizer is a callable (RTN by default,
``formats.fake_quant`` of the weight format).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

import arhq_jax.decomposition.rotate as rotate
from arhq_jax.models.config import INPUT_GROUPS
from arhq_jax.numerics.elements import HIGHEST
from arhq_jax.numerics.formats import fake_quant


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


@struct.dataclass
class Moments:
    """Running sums over tokens: ``xtx = ΣXᵀX``, ``xte = ΣXᵀE``, ``ete = ΣEᵀE`` ``[D, D]``, and
    ``count`` (int32)."""

    xtx: jax.Array
    xte: jax.Array
    ete: jax.Array
    count: jax.Array


def init_moments(dim: int, dtype=jnp.float32) -> Moments:
    z = jnp.zeros((dim, dim), dtype)
    return Moments(z, z, z, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("act_fmt",))
def update_moments(m: Moments, x, act_fmt, mask=None, tensor_scale=None) -> Moments:
    """Add the tokens of ``x [..., D]``; E = x − Q_a(x) with the runtime quantizer ``act_fmt``
    (``tensor_scale``: the static nvfp4 scale; None = dynamic over the chunk), or E = 0 for
    ``act_fmt=None`` (weight-only: C = G = 0, and J = ‖(W − R − L) H½‖² is the weight-only
    output error). Masked tokens are zeroed first (they then contribute nothing)."""
    d = x.shape[-1]
    x = x.reshape(-1, d).astype(jnp.float32)
    if mask is not None:
        keep = mask.reshape(-1, 1)
        x = jnp.where(keep, x, 0.0)
        n = jnp.sum(mask).astype(jnp.int32)
    else:
        n = jnp.int32(x.shape[0])
    if act_fmt is None:
        e = jnp.zeros_like(x)
    else:
        e = x - fake_quant(x, act_fmt, tensor_scale=tensor_scale)
    dt = m.xtx.dtype
    xd, ed = x.astype(dt), e.astype(dt)
    return Moments(m.xtx + _mm(xd.T, xd), m.xte + _mm(xd.T, ed), m.ete + _mm(ed.T, ed), m.count + n)


def finalize_moments(m: Moments) -> dict:
    """``{"H", "C", "G"}`` (``[D, D]``, divided by N; H and G symmetrized) and ``count``."""
    n = int(m.count)
    if n <= 0:
        raise ValueError("no tokens were accumulated (count is 0)")
    return {
        "H": (m.xtx + m.xtx.T) / (2 * n),
        "C": m.xte / n,
        "G": (m.ete + m.ete.T) / (2 * n),
        "count": n,
    }


@jax.jit
def objective(w, r, b, a, h, c, g) -> jax.Array:
    """``J = E_t‖x Wᵀ − Q_a(x) Rᵀ − x (B Aᵀ)ᵀ‖²`` (summed over outputs, mean over tokens) from
    the moments: W, R ``[out, in]``, B ``[out, r]``, A ``[in, r]``, H, C, G ``[in, in]``."""
    w, r = w.astype(jnp.float32), r.astype(jnp.float32)
    d = w - r - _mm(b.astype(jnp.float32), a.astype(jnp.float32).T)
    return jnp.sum(_mm(d, h) * d) + 2.0 * jnp.sum(_mm(d, c) * r) + jnp.sum(_mm(r, g) * r)


@jax.jit
def _roots(h, eps, rel_eps):
    h = 0.5 * (h + h.T)
    lam, u = jnp.linalg.eigh(h)
    root = jnp.sqrt(jnp.maximum(lam, jnp.maximum(eps, rel_eps * lam[-1])))
    return _mm(u * root, u.T), _mm(u / root, u.T)


@functools.partial(jax.jit, static_argnames=("rank",))
def branch_step(w, r, c, h_half, h_inv_half, rank: int):
    """Step 2: the rank-r ``(B, A)`` minimising J with R held fixed (f32):
    ``T H̃½ = (W − R) H̃½ + R Cᵀ H̃⁻½``, ``B = U_r Σ_r``, ``A = H̃⁻½ V_r``."""
    m = _mm(w - r, h_half) + _mm(_mm(r, c.T), h_inv_half)
    um, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return um[:, :rank] * s[:rank], _mm(h_inv_half, vt[:rank].T)


def h_roots(moments: dict, eps: float = 1e-10, rel_eps: float = 1e-7):
    """``(H̃½, H̃⁻½)`` of ``moments["H"]`` as ``refine`` uses them (``[D, D]`` f32 each)."""
    h = jnp.asarray(moments["H"], jnp.float32)
    return _roots(h, jnp.float32(eps), jnp.float32(rel_eps))


@struct.dataclass
class Refined:
    """The refined split: B ``[out, r]``, A ``[in, r]`` (storage dtype), the f32 residual
    ``W − B Aᵀ`` (recomputed from the stored factors), and the objective J of every accepted
    iterate (the start first; non-increasing)."""

    b: jax.Array
    a: jax.Array
    residual: jax.Array
    objectives: tuple


@functools.cache
def rtn_quantizer(w_fmt):
    """``R = deq(Q_w(W_res))`` by round-to-nearest in ``w_fmt`` (its own tensor scale); one
    compiled function per format."""
    return jax.jit(lambda x: fake_quant(x, w_fmt))


def accumulate_moments(runner, layer, groups, act_fmt, tensor_scales=None, rotate_block=0):
    """``{group: finalize_moments(...)}`` of the inputs of ``groups`` of ``layer``, streamed by a
    ``calibrate.LayerwiseRunner``; ``tensor_scales[group]`` the static activation scale (None:
    dynamic), ``rotate_block`` the input rotation (``rotate.rotate``; 0: none)."""
    shapes = runner.cfg.linear_shapes()
    init = {g: init_moments(shapes[INPUT_GROUPS[g][0]][1]) for g in groups}

    def update(name, state, x, mask):
        if rotate_block:
            x = rotate.rotate(x, rotate.block_for(x.shape[-1], rotate_block))
        ts = None if tensor_scales is None else tensor_scales[name]
        return update_moments(state, x, act_fmt, mask, ts)

    return {k: finalize_moments(v) for k, v in runner.accumulate(layer, init, update).items()}


def refine(
    w,
    b,
    a,
    moments: dict,
    quantize,
    iters: int,
    *,
    eps: float = 1e-10,
    rel_eps: float = 1e-7,
    rtol: float = 1e-4,
    h_roots=None,
) -> Refined:
    """Alternate branch fit and residual re-quantization (module docstring) for at most ``iters``
    iterations.

    Args:
      w: ``[out, in]`` the weight of the (smoothed/rotated) space the split lives in.
      b, a: the starting factors (e.g. ARHQ's), in their storage dtype (kept for the result).
      moments: ``finalize_moments`` output of the same input space (H, C, G).
      quantize: ``W_res [out, in] f32 → deq(Q_w(W_res)) f32``.
      iters: maximum iterations (0 returns the start).
      eps, rel_eps: eigenvalue floor of H̃, absolute and relative to λ_max.
      rtol: minimum relative decrease of J to accept an iterate.
      h_roots: ``h_roots(moments)`` computed once for projections sharing an input (optional).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    w = jnp.asarray(w, jnp.float32)
    h, c, g = (jnp.asarray(moments[k], jnp.float32) for k in ("H", "C", "G"))
    if h.shape != (w.shape[1],) * 2:
        raise ValueError(f"moments are {h.shape} but W has in = {w.shape[1]}")
    rank = b.shape[1]
    dt = b.dtype

    def residual(b_, a_):
        return w - _mm(b_.astype(jnp.float32), a_.astype(jnp.float32).T)

    res = residual(b, a)
    r = quantize(res)
    best = float(objective(w, r, b, a, h, c, g))
    objs = [best]
    if iters and rank:
        if h_roots is None:
            h_roots = _roots(h, jnp.float32(eps), jnp.float32(rel_eps))
        h_half, h_inv_half = h_roots
        for _ in range(iters):
            nb, na = branch_step(w, r, c, h_half, h_inv_half, rank=rank)
            nb, na = nb.astype(dt), na.astype(dt)
            nres = residual(nb, na)
            nr = quantize(nres)
            j = float(objective(w, nr, nb, na, h, c, g))
            if not j < best * (1.0 - rtol):
                break
            b, a, res, r, best = nb, na, nres, nr, j
            objs.append(j)
    return Refined(b, a, res, tuple(objs))


# ----------------------------------------------------------------------------- act-aware residual


@jax.jit
def act_aware_map(h, c, g, lam):
    """``(P, Ĥ)`` of the activation-aware residual: for a fixed branch L, with
    ``M = W − L`` and ``Ĥ = E[Q_a(x)ᵀ Q_a(x)] = H − C − Cᵀ + G``, the regularised objective

        J_λ(R) = J(L, R) + λ ‖R − M‖²_F = ‖(R − T) (Ĥ + λI)½‖²_F + const,
        T = M P,   P = (H − C + λI) (Ĥ + λI)⁻¹,

    so quantizing the *target* T under Ĥ (GPTQ's metric, GPTQ adding its own damping λ) or by
    RTN minimises J instead of ``‖(R − M) H½‖²`` (plain GPTQ, which ignores that the residual
    multiplies Q_a(x), not x). λ ≥ 0 (λ → 0: the exact minimiser; λ keeps P → I where Ĥ has no
    energy). Args: H, C, G ``[D, D]`` (``finalize_moments``), λ scalar. Returns P ``[D, D]`` f32
    and Ĥ ``[D, D]`` f32 (symmetrised)."""
    h, c, g = (jnp.asarray(v, jnp.float32) for v in (h, c, g))
    hh = h - c - c.T + g
    hh = 0.5 * (hh + hh.T)
    eye = jnp.eye(h.shape[0], dtype=jnp.float32)
    # P = (H − C + λI) (Ĥ + λI)⁻¹ = [(Ĥ + λI)⁻¹ (H − C + λI)ᵀ]ᵀ (Ĥ + λI symmetric)
    p = jnp.linalg.solve(hh + lam * eye, (h - c + lam * eye).T).T
    return p, hh


def act_aware_lambda(moments: dict, percdamp: float) -> float:
    """λ of ``act_aware_map``: ``percdamp`` × the mean diagonal of Ĥ (GPTQ's damping rule)."""
    h, c, g = (jnp.asarray(moments[k], jnp.float32) for k in ("H", "C", "G"))
    return float(percdamp * jnp.mean(jnp.diag(h) - 2.0 * jnp.diag(c) + jnp.diag(g)))


def mapped_quantizer(quantize, p):
    """``res ↦ quantize(res P)``: a residual quantizer (``refine``'s ``quantize``) of the
    activation-aware target ``T = res P`` (``act_aware_map``)."""
    return lambda res: quantize(_mm(jnp.asarray(res, jnp.float32), p))
