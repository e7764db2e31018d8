"""GPTQ (arXiv 2210.17323; docs/spec/methods.md §5): Hessian-aware column-by-column weight
quantization.

``gptq_quantize(W [out, in], H [in, in], fmt)`` quantizes any weight given the Hessian of the input
the quantized model sees (after rotation, flattening, permutation or smoothing), so it also serves
as the residual quantizer of SVDQuant/ARHQ (pass W_res), SERQ (W̃ with the compensated block) and
ResQ (rotated W, mixed precision via ``high_fmt``/``n_high``).

Algorithm (the IST-DASLab/QuaRot code, step for step):
  1. Dead inputs: where H_ii = 0, set H_ii = 1 and W[:, i] = 0.
  2. Optional act-order: permute by argsort(diag H) descending (stable), un-permute at the end.
  3. Damping: H += percdamp·mean(diag H)·I; if a Cholesky fails (non-finite factor), retry with
     another 0.1·percdamp·mean(diag H) added, up to ``max_damp_retries`` times (deepcompressor).
  4. U = upper Cholesky factor of H⁻¹ (chol(H), its inverse, then an upper chol).
  5. Column loop, a ``lax.fori_loop`` over columns nested in a ``lax.fori_loop`` over blocks of
     ``block_size``: at i % g == 0 fit the group on the already-updated W[:, i:i+g] (or use the
     groups fitted up front on the original W with ``static_groups``); q_i = Q(w_i),
     e_i = (w_i − q_i)/U_ii, W[:, i:block_end] −= e_i ⊗ U[i, i:block_end]; after the block one
     matmul applies the block's errors to the remaining columns.

Groups: nvfp4 uses its 16-element blocks with the tensor scale fixed from the original W (or
``tensor_scale``), nvfp4-paper 16 (16×16 tiles: fitted at i % 16 = 0 over all rows), mxfp4 32,
int formats their ``group_size``; an int group of −1 (per output row) is fitted once on the W
passed in, before dead-input zeroing, as the reference does.

Faithfulness notes:
  - Follows the reference: per-row quantizers fitted before dead zeroing, static groups after it;
    the in-block update also touches column i itself (already quantized, harmless); the error
    ``err`` is Σ (w−q)²/U_ii²/2 (the reference's ``Losses`` summed).
  - Differs: the block update is applied to all columns (U is upper triangular, so earlier ones get
    exact zeros; the current block's columns of W are never read again), twice the reference's
    FLOPs but one compiled loop for any width; Cholesky failure is detected by non-finite factors
    instead of an exception. Rounding and scales come from ``formats`` (pass
    ``int_rule="gptq"`` for the reference's ≥ 1e-5 scale clamp); ``mse_clip`` is QuaRot's
    ``find_params(mse=True)`` (grid 100, shrink to 0.2, |Δ|^2.4) for int formats; for nvfp4
    it is the E4M3 block-scale search of ``arhq_jax.decomposition.scale_search`` (not
    QuaRot's).
  - act-order with groups requires ``static_groups`` (ValueError otherwise), as does combining it
    with mixed precision or tiles.

Statistics needed from calibration: H = ΣxxᵀN⁻¹ (any positive multiple; ``hessian_update`` keeps
the reference's running mean 2/N·ΣxxT) of the exact input the quantized linear sees.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arhq_jax.decomposition import scale_search
from arhq_jax.numerics import formats as F
from arhq_jax.numerics.elements import HIGHEST

# QuaRot's find_params(mse=True): p = 1 − k/grid for k < maxshrink·grid, error Σ|Δ|^norm.
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4


@struct.dataclass
class GPTQResult:
    """Output of ``gptq_quantize``.

    Attributes:
      w_hat: ``[out, in]`` f32, the dequantized GPTQ weight (equal to ``dequantize(qtensor)``).
      qtensor: the packed ``QTensor`` (axis 1), or for mixed precision a tuple
        ``(q_low [out, in − n_high], q_high [out, n_high])``.
      err: f32 scalar, Σ (w − q)²/U_ii²/2 over all entries (the reference's loss).
      perm: int32 ``[in]`` act-order permutation (identity without act-order).
    """

    w_hat: jax.Array
    qtensor: object
    err: jax.Array
    perm: jax.Array


# ----------------------------------------------------------------------------------------------
# Hessian helpers
# ----------------------------------------------------------------------------------------------


def hessian_update(h, n, x, mask=None):
    """Running mean ``H = (2/N)·Σ x xᵀ`` (docs/spec/methods.md §5.2), f32 at HIGHEST precision.

    Args:
      h: ``[in, in]`` current H (zeros to start); n: tokens seen so far (int or int32 scalar).
      x: ``[..., in]`` new tokens; mask: ``x.shape[:-1]`` bool (False rows are skipped) or None.
    Returns:
      ``(h, n)`` updated: ``h·n/(n+b) + (2/(n+b))·XᵀX`` with b the new (unmasked) tokens.
    """
    h = jnp.asarray(h)
    d = h.shape[-1]
    x = jnp.asarray(x, jnp.float32)
    if h.shape != (d, d) or x.shape[-1] != d:
        raise ValueError(f"hessian_update: h {h.shape} and x {x.shape} do not match")
    x = x.reshape(-1, d)
    if mask is None:
        b = x.shape[0]
    else:
        m = jnp.asarray(mask, bool).reshape(-1)
        if m.shape[0] != x.shape[0]:
            raise ValueError(f"mask {jnp.shape(mask)} does not match x {x.shape[:-1]}")
        x = jnp.where(m[:, None], x, 0.0)
        b = jnp.sum(m)
    n = jnp.asarray(n, jnp.float32)
    tot = n + b
    xtx = jnp.matmul(x.T, x, precision=HIGHEST)
    h_new = (
        h.astype(jnp.float32) * (n / jnp.maximum(tot, 1.0)) + (2.0 / jnp.maximum(tot, 1.0)) * xtx
    )
    return h_new, tot.astype(jnp.int32)


def inverse_cholesky_upper(h, percdamp: float = 0.01, max_retries: int = 250):
    """Damped ``U = chol(H⁻¹)ᵀ`` (upper), retrying with more damping while the factor is not finite.

    Returns ``(U [n, n] f32, tries)``; H must already have its dead diagonal set to 1.
    """
    h = jnp.asarray(h, jnp.float32)
    n = h.shape[0]
    eye = jnp.eye(n, dtype=jnp.float32)
    base = percdamp * jnp.mean(jnp.diag(h))

    def attempt(k):
        hd = h + (base * (1.0 + 0.1 * k)) * eye
        lo = jnp.linalg.cholesky(hd)
        hinv = jax.scipy.linalg.cho_solve((lo, True), eye)
        return jnp.triu(jnp.linalg.cholesky(hinv, upper=True))

    def cond(c):
        k, u = c
        return (k < max_retries) & ~jnp.all(jnp.isfinite(u))

    def body(c):
        k, _ = c
        return k + 1, attempt(k + 1)

    k, u = jax.lax.while_loop(cond, body, (jnp.int32(0), attempt(0)))
    return u, k


# ----------------------------------------------------------------------------------------------
# Group quantizers
# ----------------------------------------------------------------------------------------------


def fit_group(
    xg, spec: F.FormatSpec, ts, mse_clip: bool, int_rule: str = "default", col_weights=None
):
    """Fit one group over all rows: xg ``[R, g]`` → (stored ``[S]``, d ``[R]``, zero ``[R]``|None).

    S = R, or R/16 for 16×16 tiles (then d is repeated over each tile's 16 rows). ``int_rule``:
    the int scale rule (``formats.INT_RULES``). ``mse_clip``: int formats QuaRot's range search,
    nvfp4 the E4M3 block-scale search (``scale_search``) weighting column j by ``col_weights[j]``
    (``[g]``; None: 1).
    """
    r, g = xg.shape
    if spec.tile is not None:
        tiles = xg.reshape(r // 16, 16, g).reshape(r // 16, 1, 16 * g)
        stored, d, _ = F.block_params(tiles, spec)
        return stored[:, 0], jnp.repeat(d[:, 0, 0], 16), None
    ts = ts if spec.name == "nvfp4" else None
    stored, d, zero = F.block_params(xg[:, None, :], spec, ts, int_rule)
    d, z = d[:, 0, 0], (None if zero is None else zero[:, 0, 0])
    if not mse_clip:
        return stored[:, 0], d, z
    if spec.name == "nvfp4":
        s, d = scale_search.search_scales(xg[:, None, :], spec, ts, col_weights)
        return s[:, 0], d[:, 0, 0], None
    return _mse_fit(xg, spec, d, z, int_rule)


def _mse_fit(xg, spec, d0, z0, int_rule):
    """QuaRot's MSE clip search over shrunk ranges (int formats), first minimum wins."""
    qmax = 2 ** (spec.bits - 1) - 1 if spec.symmetric else 2**spec.bits - 1
    lo = jnp.minimum(jnp.min(xg, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(xg, axis=1), 0.0)
    if spec.symmetric:
        hi = jnp.maximum(jnp.abs(lo), hi)

    def err_of(d, z):
        zz = None if z is None else z[:, None]
        c = F.quantize_blocks(xg, d[:, None], zz, spec, int_rule)
        e = F.dequantize_blocks(c, d[:, None], zz, spec) - xg
        return jnp.sum(jnp.abs(e) ** MSE_NORM, axis=1)

    def body(k, c):
        best, d, z = c
        p = 1.0 - k.astype(jnp.float32) / MSE_GRID
        if spec.symmetric:
            d1 = F.div(p * hi, qmax)
            z1 = None
        else:
            d1 = F.div(p * hi - p * lo, qmax)
            z1 = jnp.clip(jnp.round(F.div(-(p * lo), d1)), 0, qmax).astype(jnp.uint8)
        d1 = jnp.where(d1 > 0, d1, d0)  # an all-zero row keeps the format's fallback scale
        e = err_of(d1, z1)
        better = e < best
        d = jnp.where(better, d1, d)
        z = None if z is None else jnp.where(better, z1, z)
        return jnp.where(better, e, best), d, z

    init = (jnp.full(d0.shape, jnp.inf, jnp.float32), d0, z0)
    _, d, z = jax.lax.fori_loop(0, int(MSE_MAXSHRINK * MSE_GRID), body, init)
    return d, d, z


def _qdq(col, d, z, spec, int_rule):
    """Quantize one column ``[R]``: (int32 codes, f32 dequantized)."""
    xb, db = col[:, None, None], d[:, None, None]
    zb = None if z is None else z[:, None, None]
    c = F.quantize_blocks(xb, db, zb, spec, int_rule)
    return c.astype(jnp.int32)[:, 0, 0], F.dequantize_blocks(c, db, zb, spec)[:, 0, 0]


def _code_dtype(spec):
    return jnp.int8 if (spec.is_int and spec.bits == 8 and spec.symmetric) else jnp.uint8


def _fit_all(wp, spec, ts, g, mse_clip, int_rule):
    """All groups of ``wp [R, K]`` at once: stored ``[S, K/g]``, d/zero ``[R, K/g]``."""
    r, k = wp.shape
    groups = wp.reshape(r, k // g, g).transpose(1, 0, 2)
    stored, d, z = jax.vmap(lambda xg: fit_group(xg, spec, ts, mse_clip, int_rule))(groups)
    return stored.T, d.T, (None if z is None else z.T)


# ----------------------------------------------------------------------------------------------
# The column loop
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=(
        "spec",
        "high_spec",
        "n_high",
        "bs",
        "g",
        "mode",
        "act_order",
        "mse_clip",
        "int_rule",
        "in_pad",
        "max_retries",
    ),
)
def _gptq_core(
    w,
    h,
    ts,
    percdamp,
    *,
    spec,
    high_spec,
    n_high,
    bs,
    g,
    mode,
    act_order,
    mse_clip,
    int_rule,
    in_pad,
    max_retries,
):
    out, k = w.shape
    r = -(-out // 16) * 16 if spec.tile is not None else out
    w_orig = w
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[None, :], 0.0, w)

    def pad(a):
        return jnp.pad(a, ((0, r - a.shape[0]), (0, in_pad - a.shape[1])))

    # Parameters fitted up front (per-row formats on the W passed in, static groups after zeroing).
    n_low = k - n_high
    if mode == "row":
        pre = _fit_all(pad(w_orig), spec, ts, in_pad, mse_clip, int_rule)
    elif mode == "mixed":
        pre = _fit_all(w_orig[:, :n_low], spec, ts, n_low, mse_clip, int_rule)
        pre_h = _fit_all(w_orig[:, n_low:], high_spec, ts, n_high, mse_clip, int_rule)
    elif mode == "static":
        pre = _fit_all(pad(w), spec, ts, g, mse_clip, int_rule)

    if act_order:
        perm = jnp.argsort(jnp.diag(h), stable=True, descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = jnp.arange(k)
    u, _ = inverse_cholesky_upper(h, percdamp, max_retries)
    perm_p = jnp.concatenate([perm, jnp.arange(k, in_pad)]).astype(jnp.int32)
    u = jnp.zeros((in_pad, in_pad), jnp.float32).at[:k, :k].set(u)
    u = u.at[jnp.arange(k, in_pad), jnp.arange(k, in_pad)].set(1.0)
    wp = pad(w)

    n_groups = in_pad // g if g > 0 else 1
    s_rows = r // 16 if spec.tile is not None else r
    asym = spec.is_int and not spec.symmetric
    zero_like = jnp.zeros((r,), jnp.uint8) if asym else None
    if mode == "dynamic":
        p0 = (jnp.zeros((s_rows,), spec.scale_dtype), jnp.ones((r,), jnp.float32), zero_like)
        scales0 = jnp.zeros((s_rows, n_groups), p0[0].dtype)
        zeros0 = None if zero_like is None else jnp.zeros((r, n_groups), jnp.uint8)
    else:
        p0, scales0, zeros0 = None, None, None

    # The nvfp4 scale search weighs column j by GPTQ's cost of its error, 1/U_jj².
    col_w = 1.0 / jnp.square(jnp.diag(u))

    def fit_dyn(xg, i, scales, zeros):
        cw = jax.lax.dynamic_slice(col_w, (i,), (xg.shape[1],))
        st, d, z = fit_group(xg, spec, ts, mse_clip, int_rule, cw)
        gi = i // g
        scales = jax.lax.dynamic_update_slice(scales, st[:, None], (0, gi))
        if zeros is not None:
            zeros = jax.lax.dynamic_update_slice(zeros, z[:, None], (0, gi))
        return (st, d, z), scales, zeros

    def col_quant(i, col, params):
        if mode == "dynamic":
            _, d, z = params
            return _qdq(col, d, z, spec, int_rule)
        if mode == "mixed":
            z_lo = None if pre[2] is None else pre[2][:, 0]
            c_lo, q_lo = _qdq(col, pre[1][:, 0], z_lo, spec, int_rule)
            zh = None if pre_h[2] is None else pre_h[2][:, 0]
            c_hi, q_hi = _qdq(col, pre_h[1][:, 0], zh, high_spec, int_rule)
            hi = i >= n_low
            return jnp.where(hi, c_hi, c_lo), jnp.where(hi, q_hi, q_lo)
        gi = perm_p[i] // g if mode == "static" else 0
        d = jax.lax.dynamic_index_in_dim(pre[1], gi, 1, keepdims=False)
        z = None if pre[2] is None else jax.lax.dynamic_index_in_dim(pre[2], gi, 1, keepdims=False)
        return _qdq(col, d, z, spec, int_rule)

    def block_body(b, carry):
        wp, qout, cout, loss, params, scales, zeros = carry
        i0 = b * bs
        ub = jax.lax.dynamic_slice(u, (i0, i0), (bs, bs))
        wb = jax.lax.dynamic_slice(wp, (0, i0), (r, bs))
        if mode == "dynamic" and g >= bs:
            params, scales, zeros = jax.lax.cond(
                i0 % g == 0,
                lambda a: fit_dyn(jax.lax.dynamic_slice(wp, (0, i0), (r, g)), i0, *a[1:]),
                lambda a: a,
                (params, scales, zeros),
            )

        def col_body(j, c):
            wb, qb, cb, eb, loss, params, scales, zeros = c
            i = i0 + j
            if mode == "dynamic" and g < bs:
                params, scales, zeros = jax.lax.cond(
                    i % g == 0,
                    lambda a: fit_dyn(jax.lax.dynamic_slice(wb, (0, j), (r, g)), i, *a[1:]),
                    lambda a: a,
                    (params, scales, zeros),
                )
            col = jax.lax.dynamic_index_in_dim(wb, j, 1, keepdims=False)
            code, q = col_quant(i, col, params)
            urow = jax.lax.dynamic_index_in_dim(ub, j, 0, keepdims=False)
            dii = urow[j]
            e = F.div(col - q, dii)
            loss = loss + jnp.sum(jnp.square(col - q)) / (dii * dii) / 2.0
            wb = wb - e[:, None] * urow[None, :]
            qb = jax.lax.dynamic_update_index_in_dim(qb, q, j, 1)
            cb = jax.lax.dynamic_update_index_in_dim(cb, code, j, 1)
            eb = jax.lax.dynamic_update_index_in_dim(eb, e, j, 1)
            return wb, qb, cb, eb, loss, params, scales, zeros

        zb = jnp.zeros((r, bs), jnp.float32)
        init = (wb, zb, jnp.zeros((r, bs), jnp.int32), zb, loss, params, scales, zeros)
        _, qb, cb, eb, loss, params, scales, zeros = jax.lax.fori_loop(0, bs, col_body, init)
        urows = jax.lax.dynamic_slice(u, (i0, 0), (bs, in_pad))
        wp = wp - jnp.matmul(eb, urows, precision=HIGHEST)
        qout = jax.lax.dynamic_update_slice(qout, qb, (0, i0))
        cout = jax.lax.dynamic_update_slice(cout, cb, (0, i0))
        return wp, qout, cout, loss, params, scales, zeros

    init = (
        wp,
        jnp.zeros((r, in_pad), jnp.float32),
        jnp.zeros((r, in_pad), jnp.int32),
        jnp.float32(0.0),
        p0,
        scales0,
        zeros0,
    )
    _, qout, cout, loss, _, scales, zeros = jax.lax.fori_loop(0, in_pad // bs, block_body, init)
    inv = jnp.argsort(perm_p)
    qout, cout = qout[:, inv], cout[:, inv]
    if mode in ("row", "static", "mixed"):
        scales = pre[0]
        zeros = pre[2]
    extra = (pre_h[0], pre_h[2]) if mode == "mixed" else None
    return qout, cout, scales, zeros, loss, perm, extra


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _check_finite(name, a):
    if not bool(jnp.all(jnp.isfinite(a))):
        raise ValueError(f"{name} contains NaN or Inf")


def _pack(codes, spec, k):
    """int32 codes ``[R, ≥k]`` → storage codes ``[R, K_pad(/2)]`` as ``formats.quantize`` has."""
    kp = F.padded_length(k, spec)
    c = codes[:, :kp].astype(_code_dtype(spec))
    if spec.packed:
        if c.shape[-1] % 2:
            c = jnp.pad(c, ((0, 0), (0, 1)))
        c = F.pack_nibbles(c)
    return c


def _qtensor(codes, scales, zeros, ts, spec, shape, int_rule):
    return F.QTensor(
        codes=codes,
        scales=scales,
        tensor_scale=jnp.asarray(ts, jnp.float32),
        zeros=zeros,
        shape=tuple(shape),
        spec=spec,
        axis=1,
        dtype="float32",
        int_rule=int_rule,
    )


def gptq_quantize(
    w,
    h,
    fmt,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    tensor_scale=None,
    mse_clip: bool = False,
    high_fmt=None,
    n_high: int = 0,
    int_rule: str = "default",
    max_damp_retries: int = 250,
) -> GPTQResult:
    """GPTQ-quantize ``w [out, in]`` under the Hessian ``h [in, in]`` in format ``fmt``.

    Args:
      w: weight ``[out, in]`` (any float dtype; computed in f32).
      h: ``[in, in]`` Hessian of the linear's input (positive semi-definite; any positive scale).
      fmt: format name or ``FormatSpec`` (the group is the format's block/group size).
      percdamp: damping fraction of mean(diag H) (> 0).
      block_size: lazy-batch width (> 0); must be a multiple or a divisor of the group size.
      act_order: quantize columns by decreasing H_ii; with groups it needs ``static_groups``.
      static_groups: fit every group on the original W before the loop.
      tensor_scale: nvfp4 only, the fixed tensor scale in the format's convention (gs for
        "nvfp4", g for "nvfp4-modelopt"; default: ``formats.nvfp4_tensor_scale`` of the original W).
      mse_clip: int formats: QuaRot's MSE range-shrinking search of the group scales; nvfp4:
        the search of each block's E4M3 scale (``scale_search``) under GPTQ's column costs.
      high_fmt, n_high: mixed precision (ResQ): the last ``n_high`` input columns use
        ``high_fmt``; both formats must be per-row int (group −1).
      int_rule: the int scale rule (``formats.INT_RULES``; both formats under mixed precision):
        "gptq" is the reference quantizer's (``gptq_method.gptq_weight`` passes it).
      max_damp_retries: extra-damping retries after a failed Cholesky.
    Returns:
      ``GPTQResult``; ``dequantize(result.qtensor)`` equals ``result.w_hat`` bit for bit.
    Raises:
      ValueError: bad shapes, non-finite input, incompatible options, or a Cholesky that failed
        after every retry.
    """
    w = jnp.asarray(w)
    h = jnp.asarray(h)
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    out, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"h must be [in, in] = [{k}, {k}], got shape {h.shape}")
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    _check_finite("w", w)
    _check_finite("h", h)
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp}")
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    spec = F.resolve_format(fmt)
    if tensor_scale is not None and spec.name != "nvfp4":
        raise ValueError(f"tensor_scale applies to nvfp4 only, not {spec.name}")
    if mse_clip and not (spec.is_int or spec.name == "nvfp4"):
        raise ValueError(f"mse_clip applies to int formats and nvfp4, not {spec.label}")
    F.check_int_rule(spec, int_rule)
    high_spec = None
    if high_fmt is not None or n_high:
        if high_fmt is None or not 0 < n_high < k:
            raise ValueError(f"mixed precision needs high_fmt and 0 < n_high < in={k}")
        high_spec = F.resolve_format(high_fmt)
        F.check_int_rule(high_spec, int_rule)
        for s in (spec, high_spec):
            if not (s.is_int and s.block == -1):
                raise ValueError(
                    f"mixed precision needs per-row int formats, got {s.label} with group {s.block}"
                )
        if act_order or static_groups:
            raise ValueError("mixed precision does not combine with act_order/static_groups")
        mode, g = "mixed", -1
    elif spec.block == -1:
        mode, g = "row", -1
    else:
        g = spec.block
        mode = "static" if static_groups else "dynamic"
        if act_order and not static_groups:
            raise ValueError(
                "act_order with groups needs static_groups=True (GPTQ would mix "
                "group scales across permuted columns)"
            )
        if mode == "dynamic" and g % block_size and block_size % g:
            raise ValueError(
                f"block_size {block_size} must be a multiple or a divisor of the group size {g}"
            )
    if spec.tile is not None and act_order:
        raise ValueError("act_order is not supported with 16x16 tiles")

    unit = block_size if g <= 0 else math.lcm(block_size, g)
    in_pad = -(-k // unit) * unit
    ts = jnp.float32(1.0)
    if spec.name == "nvfp4":
        ts = F.nvfp4_tensor_scale(w, spec) if tensor_scale is None else jnp.float32(tensor_scale)
        if not (np.isfinite(float(ts)) and float(ts) > 0):
            raise ValueError(f"tensor_scale must be positive and finite, got {float(ts)}")
    qout, cout, scales, zeros, loss, perm, extra = _gptq_core(
        w,
        h,
        ts,
        jnp.float32(percdamp),
        spec=spec,
        high_spec=high_spec,
        n_high=int(n_high),
        bs=block_size,
        g=g,
        mode=mode,
        act_order=bool(act_order),
        mse_clip=bool(mse_clip),
        int_rule=int_rule,
        in_pad=in_pad,
        max_retries=int(max_damp_retries),
    )
    w_hat = qout[:out, :k]
    if not bool(jnp.all(jnp.isfinite(w_hat))):
        raise ValueError(
            "GPTQ produced non-finite weights: the damped Hessian is not positive "
            f"definite after {max_damp_retries} retries"
        )
    if mode == "mixed":
        n_low = k - n_high
        q_lo = _qtensor(
            _pack(cout[:, :n_low], spec, n_low), scales, zeros, 1.0, spec, (out, n_low), int_rule
        )
        q_hi = _qtensor(
            _pack(cout[:, n_low:k], high_spec, n_high),
            extra[0],
            extra[1],
            1.0,
            high_spec,
            (out, n_high),
            int_rule,
        )
        qt = (q_lo, q_hi)
    else:
        kp = F.padded_length(k, spec)
        ng = 1 if g == -1 else kp // g
        rows = cout if spec.tile is not None else cout[:out]
        qt = _qtensor(
            _pack(rows, spec, k),
            scales[:, :ng],
            None if zeros is None else zeros[:out, :ng],
            ts,
            spec,
            (out, k),
            int_rule,
        )
    return GPTQResult(w_hat=w_hat, qtensor=qt, err=loss, perm=perm.astype(jnp.int32))


def rtn_quantize(w, fmt, *, tensor_scale=None, int_rule: str = "default") -> jax.Array:
    """Round-to-nearest baseline: ``fake_quant(w, fmt)`` in f32 (what GPTQ equals at H = I)."""
    w = jnp.asarray(w, jnp.float32)
    return F.fake_quant(w, fmt, tensor_scale=tensor_scale, int_rule=int_rule)
