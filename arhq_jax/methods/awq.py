"""FPRAG-AWQ and its dynamic-heuristic (DH) rounding (anhnda/FPRAG; docs/spec/methods.md §6).

Weight-only int4 asymmetric [0, 15], group 128, with FPRAG's rounding (RNE *after* adding the
zero point, no range widening, scale ≥ 1e-8, zero point clamped to [0, 15]):

    s_α  = max(ŝ^α, 1e-5),  ŝ_j = E[x_j²]                α ∈ {0, 1/20, …, 1}
    W_α  = Q(W diag s_α) · diag(s_α)⁻¹
    loss = mean((X Wᵀ − X W_αᵀ)²)  on the given tokens  → α* = first argmin (ties: smaller α)
    W   ← W_α*

With ``rounding="dh"`` the quantizer Q is replaced, in every α candidate and the final pass, by
the dynamic heuristic: with μ = E[x]/s (signed), per output row the error e = Σ_j (w−ŵ)_j μ_j is
reduced greedily by flipping rounding directions (valid flips push e toward 0, stay in [0, 15]
and avoid Kneedle outlier channels), taking the prefix of the candidates sorted by rounding cost
that minimizes |e − cumsum(impact)|, capped at ⌊max_flip·in⌋ flips per row. Scales and zero
points are never refit.

Faithfulness (checked against ``awq_stand_xl.py`` / ``awq_dh_xl.py``):
  - Follows the code: zero-padding of the last group (it does change that group's min/max; the
    ``formats`` fprag variant pads by repetition instead, so the two differ only when
    in % group ≠ 0); Kneedle on the first half of |μ| sorted descending, normalized to [0, 1]
    against an even x grid, knee = argmax |y − chord| shifted by ⌊tolerance·n_half⌋ (< 3 points:
    n//2; flat: n//2; fewer than 3 in the half: the top-5 % value); outliers are |μ| > the knee
    value; the cap counts flips in sorted order; invalid candidates sort last with impact 0.
  - The standard code clamps after the power, s = max(ŝ^α, 1e-5); the DH code clamps before,
    s = max(ŝ, 1e-5)^α. Both are kept (``rounding`` picks the matching one).
  - Differs: everything runs in f32 at HIGHEST precision (the reference's MSE matmuls and μ run in
    the model dtype, bf16/fp16: the "parity" precision quirks of docs/spec/methods.md §6 are not
    reproduced); the loss
    omits the bias (it cancels in the difference); token subsampling (≤ 2,048 random tokens,
    1,024 for lm_head) is the caller's choice of ``x``; sorting is stable where torch's is not.

Statistics needed from calibration: per-channel mean_sq E[x²] (salience) and, for DH, mean E[x],
over all calibration tokens of the linear's input; plus a sample of stored tokens X for the loss
(FPRAG captures inputs from the *partially quantized* model, 16 linears per batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from arhq_jax.numerics import formats as F
from arhq_jax.numerics.elements import HIGHEST
from arhq_jax.numerics.formats import div

QMAX = 15  # int4 asymmetric [0, 15]


@struct.dataclass
class AWQResult:
    """Output of ``awq_quantize``.

    Attributes:
      w_hat: ``[out, in]`` f32 written-back weight Q(W diag s*)·diag(s*)⁻¹.
      alpha: ``[n_chunks]`` f32 chosen α per output chunk (one chunk unless lm_head-style split).
      scales: ``[n_chunks, in]`` f32 the chosen s*.
      losses: ``[n_chunks, n_grid + 1]`` f32 output MSE of every α candidate.
    """

    w_hat: jax.Array
    alpha: jax.Array
    scales: jax.Array
    losses: jax.Array


# ----------------------------------------------------------------------------------------------
# FPRAG's group quantizer
# ----------------------------------------------------------------------------------------------


def _setup(w, group_size):
    """Zero-padded W and its FPRAG grid: (wp, w_div, w_int, scale, zp), all ``[out, in_pad]``."""
    out, k = w.shape
    ng = -(-k // group_size)
    kp = ng * group_size
    wp = jnp.pad(w, ((0, 0), (0, kp - k)))
    wg = wp.reshape(out, ng, group_size)
    lo = jnp.min(wg, axis=2, keepdims=True)
    hi = jnp.max(wg, axis=2, keepdims=True)
    # div: a true f32 division (XLA rewrites x / broadcast(y) as x·(1/y), an ulp off at ties).
    scale = jnp.maximum(div(hi - lo, QMAX), 1e-8)
    zp = jnp.clip(jnp.round(div(-lo, scale)), 0, QMAX)
    scale = jnp.broadcast_to(scale, wg.shape).reshape(out, kp)
    zp = jnp.broadcast_to(zp, wg.shape).reshape(out, kp)
    w_div = div(wp, scale)
    w_int = jnp.clip(jnp.round(w_div + zp), 0, QMAX)  # RNE after adding z
    return wp, w_div, w_int, scale, zp


@functools.partial(jax.jit, static_argnames=("group_size",))
def fprag_quantize(w, group_size: int = 128) -> jax.Array:
    """FPRAG int4 asym [0, 15] fake-quant of ``w [out, in]`` per group along ``in`` (f32)."""
    w = jnp.asarray(w, jnp.float32)
    _, _, w_int, scale, zp = _setup(w, group_size)
    return ((w_int - zp) * scale)[:, : w.shape[1]]


# ----------------------------------------------------------------------------------------------
# Kneedle outliers and the dynamic heuristic
# ----------------------------------------------------------------------------------------------


def kneedle_index(y, tolerance: float = 0.0) -> jax.Array:
    """FPRAG's ``find_knee_point`` on a 1-D curve ``y`` (static length n): int32 index.

    Normalizes y to [0, 1] against x = linspace(0, 1, n), takes argmax |y − chord| (chord from the
    first to the last point), then shifts by ⌊tolerance·n⌋ (clipped to n − 1) unless the knee is
    the last point. n < 3 or a flat curve (range < 1e-10) gives n // 2.
    """
    y = jnp.asarray(y, jnp.float32)
    n = y.shape[0]
    if n < 3:
        return jnp.int32(n // 2)
    lo, hi = jnp.min(y), jnp.max(y)
    rng = hi - lo
    yn = (y - lo) / jnp.where(rng < 1e-10, 1.0, rng)
    xn = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)
    line = yn[0] + (yn[-1] - yn[0]) * xn
    knee = jnp.argmax(jnp.abs(yn - line)).astype(jnp.int32)
    shifted = jnp.clip(knee + int(tolerance * n), 0, n - 1)
    knee = jnp.where(knee < n - 1, shifted, knee)
    return jnp.where(rng < 1e-10, jnp.int32(n // 2), knee)


def outlier_threshold(mu, knee_tolerance: float = 0.0) -> jax.Array:
    """The Kneedle threshold on |μ| (``compute_dynamic_outlier_threshold``): f32 scalar.

    Channels with |μ_j| strictly above it are outliers and never flipped.
    """
    a = jnp.sort(jnp.abs(jnp.asarray(mu, jnp.float32)))[::-1]
    n = a.shape[0]
    half = a[: n // 2]
    if half.shape[0] < 3:
        return a[int(0.05 * n)]
    return a[kneedle_index(half, knee_tolerance)]


def _dh_codes(w, mu, group_size, knee_tolerance, max_flip):
    """The DH rounding: ``(w_int [out, in_pad] after the flips, scale, zp (both [out, in_pad]),
    flips [out] int32, outliers [in_pad] bool)``."""
    out, k = w.shape
    wp, w_div, w_int, scale, zp = _setup(w, group_size)
    kp = wp.shape[1]
    mu_p = jnp.pad(jnp.asarray(mu, jnp.float32), (0, kp - k))
    w_q = (w_int - zp) * scale
    err = jnp.sum((wp - w_q) * mu_p[None, :], axis=1)

    frac = w_div + zp - w_int
    flip_dir = jnp.where(jnp.sign(frac) == 0, 1.0, jnp.sign(frac))
    impact = mu_p[None, :] * flip_dir * scale
    valid = jnp.sign(impact) == jnp.sign(err)[:, None]
    prop = w_int + flip_dir
    valid &= (prop >= 0) & (prop <= QMAX)
    outliers = jnp.abs(mu_p) > outlier_threshold(mu_p, knee_tolerance)
    valid &= ~outliers[None, :]

    cost = jnp.where(valid, jnp.abs(frac), -1.0)
    cap = int(max_flip * k)
    m = min(cap + 1, kp)
    if m < kp:
        # Only the first min(K*, cap) sorted candidates are ever flipped, and |e − cumsum| is
        # quasi-convex in K (valid impacts all share e's sign, so the f32 prefix sums move
        # monotonically toward and past e): the best prefix length clipped to cap is found
        # among the top cap + 1 candidates. top_k breaks ties by lower index, as the stable
        # sort does.
        _, order = jax.lax.top_k(cost, m)
    else:
        order = jnp.argsort(cost, axis=1, stable=True, descending=True)
    s_valid = jnp.take_along_axis(valid, order, axis=1)
    s_imp = jnp.where(s_valid, jnp.take_along_axis(impact, order, axis=1), 0.0)
    resid = jnp.abs(err[:, None] - jnp.cumsum(s_imp, axis=1))
    best_k = jnp.argmin(jnp.concatenate([jnp.abs(err)[:, None], resid], axis=1), axis=1)
    chosen = (jnp.arange(m)[None, :] < best_k[:, None]) & s_valid
    chosen &= jnp.cumsum(chosen.astype(jnp.int32), axis=1) <= cap
    s_dir = jnp.where(chosen, jnp.take_along_axis(flip_dir, order, axis=1), 0.0)
    rows = jnp.arange(out)[:, None]
    delta = jnp.zeros_like(w_int).at[rows, order].add(s_dir)
    w_int = jnp.clip(w_int + delta, 0, QMAX)
    return w_int, scale, zp, jnp.sum(chosen, axis=1).astype(jnp.int32), outliers


@functools.partial(jax.jit, static_argnames=("group_size", "knee_tolerance", "max_flip"))
def dh_quantize(w, mu, group_size: int = 128, knee_tolerance: float = 0.0, max_flip: float = 0.01):
    """FPRAG's dynamic-heuristic rounding of ``w [out, in]`` given μ ``[in]`` (= E[x]/s).

    Returns ``(w_hat [out, in] f32, flips [out] int32, outliers [in] bool)``.
    """
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[1]
    w_int, scale, zp, flips, outliers = _dh_codes(w, mu, group_size, knee_tolerance, max_flip)
    w_hat = ((w_int - zp) * scale)[:, :k]
    return w_hat, flips, outliers[:k]


@functools.partial(
    jax.jit, static_argnames=("rounding", "group_size", "knee_tolerance", "max_flip")
)
def _final_codes(w_scaled, mu, *, rounding, group_size, knee_tolerance, max_flip):
    if rounding == "dh":
        w_int, scale, zp, _, _ = _dh_codes(w_scaled, mu, group_size, knee_tolerance, max_flip)
    else:
        _, _, w_int, scale, zp = _setup(w_scaled, group_size)
    # One scale and zero point per group (they are constant over the group's columns).
    return w_int.astype(jnp.uint8), scale[:, ::group_size], zp[:, ::group_size].astype(jnp.uint8)


def awq_qtensor(
    w,
    s,
    *,
    mean_x=None,
    rounding: str = "rne",
    group_size: int = 128,
    knee_tolerance: float = 0.0,
    max_flip: float = 0.01,
) -> F.QTensor:
    """The packed ``Q(W diag s)`` of the chosen scale ``s [in]``: a ``QTensor`` in int4-asym
    (``int_rule="fprag"``, group ``group_size``) whose ``dequantize`` is bit for bit the
    quantized weight of the α search's winning candidate (before the division by s).

    The runtime then computes ``(x/s)·deq(Q)ᵀ`` (``QuantLinear`` with ``smooth=s``), which is
    ``x·ŵᵀ`` up to f32 rounding. The last group is zero-padded as in FPRAG's code.
    """
    w = jnp.asarray(w, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    out, k = w.shape
    if s.shape != (k,):
        raise ValueError(f"s must be [{k}], got shape {s.shape}")
    mu = jnp.zeros((k,), jnp.float32) if mean_x is None else jnp.asarray(mean_x, jnp.float32) / s
    codes, scale, zp = _final_codes(
        w * s[None, :],
        mu,
        rounding=rounding,
        group_size=int(group_size),
        knee_tolerance=float(knee_tolerance),
        max_flip=float(max_flip),
    )
    spec = F.resolve_format("int4-asym", group_size=int(group_size))
    return F.QTensor(
        codes=F.pack_nibbles(codes),
        scales=scale,
        tensor_scale=jnp.float32(1.0),
        zeros=zp,
        shape=(out, k),
        spec=spec,
        axis=1,
        dtype="float32",
        int_rule="fprag",
    )


def dh_row_error(w, w_hat, mu) -> jax.Array:
    """Per-row error on the mean input, e_i = Σ_j (w − ŵ)_ij μ_j ``[out]``."""
    return jnp.sum((jnp.asarray(w, jnp.float32) - w_hat) * jnp.asarray(mu, jnp.float32), axis=1)


# ----------------------------------------------------------------------------------------------
# α search
# ----------------------------------------------------------------------------------------------


def awq_scales(salience, alpha, rounding: str = "rne") -> jax.Array:
    """s_α: ``max(ŝ^α, 1e-5)`` (standard code) or ``max(ŝ, 1e-5)^α`` (DH code)."""
    sal = jnp.asarray(salience, jnp.float32)
    if rounding == "dh":
        return jnp.power(jnp.maximum(sal, 1e-5), alpha)
    return jnp.maximum(jnp.power(sal, alpha), 1e-5)


def _qdq(w_scaled, mu, rounding, group_size, knee_tolerance, max_flip):
    if rounding == "dh":
        return dh_quantize(w_scaled, mu, group_size, knee_tolerance, max_flip)[0]
    return fprag_quantize(w_scaled, group_size)


@functools.partial(
    jax.jit, static_argnames=("rounding", "n_grid", "group_size", "knee_tolerance", "max_flip")
)
def _search(w, x, salience, mean_x, *, rounding, n_grid, group_size, knee_tolerance, max_flip):
    y = jnp.matmul(x, w.T, precision=HIGHEST)

    def candidate(alpha):
        s = awq_scales(salience, alpha, rounding)
        wq = _qdq(w * s[None, :], mean_x / s, rounding, group_size, knee_tolerance, max_flip)
        return div(wq, s[None, :])

    def loss(alpha):
        diff = y - jnp.matmul(x, candidate(alpha).T, precision=HIGHEST)
        return jnp.mean(jnp.square(diff))

    alphas = jnp.arange(n_grid + 1, dtype=jnp.float32) / n_grid
    losses = jax.lax.map(loss, alphas)  # one quantized copy of W alive at a time
    best = jnp.argmin(losses)  # first minimum: ties keep the smaller α
    alpha = alphas[best]
    return candidate(alpha), alpha, awq_scales(salience, alpha, rounding), losses


def awq_quantize(
    w,
    x,
    salience,
    *,
    mean_x=None,
    rounding: str = "rne",
    n_grid: int = 20,
    group_size: int = 128,
    knee_tolerance: float = 0.0,
    max_flip: float = 0.01,
    n_out_chunks: int = 1,
) -> AWQResult:
    """FPRAG-AWQ of one linear: α search on ``x`` then the write-back.

    Args:
      w: ``[out, in]`` weight.
      x: ``[N, in]`` (or ``[..., in]``) stored calibration tokens for the loss.
      salience: ``[in]`` ŝ = E[x²] over all calibration tokens.
      mean_x: ``[in]`` E[x]; required for ``rounding="dh"``.
      rounding: ``"rne"`` (standard FPRAG-AWQ) or ``"dh"`` (dynamic heuristic).
      n_grid: α grid k/n_grid, k = 0..n_grid (21 points by default).
      group_size: int4 group along ``in`` (128).
      knee_tolerance, max_flip: DH's Kneedle shift and per-row flip cap fraction.
      n_out_chunks: split ``out`` into chunks with their own α (4 for FPRAG's lm_head); chunk
        size ``out // n``, the last one takes the remainder.
    Returns:
      ``AWQResult``.
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    out, k = w.shape
    x = jnp.asarray(x)
    if x.shape[-1] != k or x.size == 0:
        raise ValueError(f"x must be [..., {k}] with tokens, got shape {x.shape}")
    x = x.reshape(-1, k).astype(jnp.float32)
    salience = jnp.asarray(salience, jnp.float32)
    if salience.shape != (k,):
        raise ValueError(f"salience must be [{k}], got shape {salience.shape}")
    if rounding not in ("rne", "dh"):
        raise ValueError(f"rounding must be 'rne' or 'dh', got {rounding!r}")
    if rounding == "dh":
        if mean_x is None:
            raise ValueError("rounding='dh' needs mean_x (E[x] per input channel)")
        mean_x = jnp.asarray(mean_x, jnp.float32)
        if mean_x.shape != (k,):
            raise ValueError(f"mean_x must be [{k}], got shape {mean_x.shape}")
    else:
        mean_x = jnp.zeros((k,), jnp.float32)
    if not (isinstance(n_grid, int) and n_grid >= 1):
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not (isinstance(n_out_chunks, int) and 1 <= n_out_chunks <= out):
        raise ValueError(f"n_out_chunks must be in [1, out={out}], got {n_out_chunks!r}")
    w = w.astype(jnp.float32)
    for name, a in (("w", w), ("x", x), ("salience", salience), ("mean_x", mean_x)):
        if not bool(jnp.all(jnp.isfinite(a))):
            raise ValueError(f"{name} contains NaN or Inf")
    if bool(jnp.any(salience < 0)):
        raise ValueError("salience E[x²] must be non-negative")

    size = out // n_out_chunks
    bounds = [
        (i * size, out if i == n_out_chunks - 1 else (i + 1) * size) for i in range(n_out_chunks)
    ]
    parts = [
        _search(
            w[a:b],
            x,
            salience,
            mean_x,
            rounding=rounding,
            n_grid=n_grid,
            group_size=group_size,
            knee_tolerance=float(knee_tolerance),
            max_flip=float(max_flip),
        )
        for a, b in bounds
    ]
    return AWQResult(
        w_hat=jnp.concatenate([p[0] for p in parts], axis=0),
        alpha=jnp.stack([p[1] for p in parts]),
        scales=jnp.stack([p[2] for p in parts]),
        losses=jnp.stack([p[3] for p in parts]),
    )
