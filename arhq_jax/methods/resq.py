"""ResQ (arXiv 2412.14363; utkarsh-dmx/project-resq; docs/spec/methods.md §8): PCA bases, Haar
rotations
within the low/high subspaces, mixed-precision (4-bit + 8-bit) quantizers and Hadamard transforms.

    H        = uncentered second moment of the input (f64), damped by 0.01·mean(diag H)
    P        = eigh(H) eigenvectors, ascending: the "high" subspace is the LAST n_high = d/8 columns
    U        = P · blockdiag(R_low, R_high),  R ∈ Haar O(n): QR of a Gaussian, columns ·sign(diag r)
    x' = x U,  W' = W U                      (orthogonal: x'W'ᵀ = xWᵀ)
    weights  : per output row, symmetric, first d − n_high columns 4-bit, last n_high 8-bit (GPTQ
               with MSE clip in the reference: ``gptq_quantize(..., high_fmt, n_high, mse_clip)``)
    acts     : per token, asymmetric, separate scale/zero for the 4-bit and the 8-bit part

Faithfulness (checked against ``get_basis.py``, ``hadamard_utils.py``, ``quant_utils.py``,
``eval_utils/gptq_utils.py``):
  - Follows the code: damping before an f64 ``eigh`` sorted ascending; Haar rotations from an f64
    QR with ``q *= sign(diag(r))``; U = P·blockdiag(R_low, R_high); weight quantizer QuaRot's
    symmetric per-channel (scale max(amax, 1e-5)/qmax: ``int_rule="gptq"``), MSE clip optional
    (on in the reference); activations QuaRot's asymmetric per-token quantizer (range widened to
    0, clip ratio 1), applied separately to the two parts.
  - Differs: rotations come from a JAX PRNG key (torch's ``randn`` stream cannot be reproduced);
    non-power-of-two Hadamard sizes use Paley I/II constructions (orders q+1, 2(q+1) for prime q)
    times a Sylvester power of two instead of QuaRot's hard-coded tables, so the matrix differs
    but is equally orthogonal and ±1/√n. Per-KV-head U_V, the online U_K on post-RoPE keys, the
    per-head o_proj activation layout and the KV cache are model-level fusions for the pipeline
    (``resq_method``); this module gives the per-linear pieces (``resq_rotation`` also serves
    per-head bases; ``ResQLinear.perm`` is o_proj's online rearrangement; ``pack=True`` stores
    the weight as packed ``QTensor`` s).

Statistics needed from calibration: H = ΣxxᵀN⁻¹ of the q/k/v and gate/up inputs (summed over
layers for ``full_shared``: (ΣH_attn + ΣH_mlp)/(2·L)), after RMSNorm γ has been fused into the
consumers; for GPTQ, H of the rotated input (= Uᵀ H U, ``rotate_hessian``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import arhq_jax.methods.gptq as G
from arhq_jax.linears.base import WeightFeatures, matmul_nt
from arhq_jax.numerics import formats as F
from arhq_jax.numerics.elements import HIGHEST

W_LOW = F.resolve_format("int4", group_size=-1)
W_HIGH = F.resolve_format("int8", group_size=-1)
W_RULE = "gptq"  # the weights' int scale rule (QuaRot's quantizer), GPTQ and RTN alike
A_LOW = F.resolve_format("int4-asym", group_size=-1)
A_HIGH = F.resolve_format("int8-asym", group_size=-1)


# ----------------------------------------------------------------------------------------------
# Bases and rotations
# ----------------------------------------------------------------------------------------------


def _haar_np(key, n: int) -> np.ndarray:
    with jax.enable_x64(True):
        g = jax.random.normal(key, (n, n), dtype=jnp.float64)
        q, r = jnp.linalg.qr(g)
        return np.asarray(q * jnp.sign(jnp.diag(r))[None, :])


def haar_rotation(key, n: int) -> jax.Array:
    """Haar-distributed orthogonal ``[n, n]`` f32: f64 QR of a Gaussian, columns ·sign(diag R)."""
    if n < 0:
        raise ValueError(f"rotation size must be >= 0, got {n}")
    return jnp.asarray(_haar_np(key, n) if n else np.zeros((0, 0)), jnp.float32)


def pca_basis(h, damp: float = 0.01):
    """f64 ``eigh`` of ``h + damp·mean(diag h)·I``: ``(evals [d] ascending, P [d, d])``, f64 numpy.

    Eigenvalues are of the damped matrix, as in the reference.
    """
    h = np.asarray(h, np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"h must be a square [d, d] matrix, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("h contains NaN or Inf")
    with jax.enable_x64(True):
        hd = jnp.asarray(h) + damp * np.mean(np.diag(h)) * jnp.eye(h.shape[0], dtype=jnp.float64)
        evals, evecs = jnp.linalg.eigh(hd, symmetrize_input=True)
        order = jnp.argsort(evals)
        return np.asarray(evals[order]), np.asarray(evecs[:, order])


@struct.dataclass
class ResQRotation:
    """``u [d, d]`` f32 (x' = x u; the high subspace is the last ``n_high`` columns), ``evals [d]``
    f32 ascending eigenvalues of the damped H, and the static ``n_high``."""

    u: jax.Array
    evals: jax.Array
    n_high: int = struct.field(pytree_node=False)


def resq_rotation(
    h, key, *, high_frac: float = 1 / 8, n_high: int | None = None, damp: float = 0.01
) -> ResQRotation:
    """U = P·blockdiag(R_low, R_high) from the input second moment ``h [d, d]``.

    ``n_high`` defaults to ``int(high_frac·d)`` (d/8). ``key`` is a JAX PRNG key.
    """
    evals, p = pca_basis(h, damp)
    d = p.shape[0]
    nh = int(high_frac * d) if n_high is None else int(n_high)
    if not 0 <= nh <= d:
        raise ValueError(f"n_high must be in [0, {d}], got {nh}")
    k_lo, k_hi = jax.random.split(key)
    blk = np.zeros((d, d))
    if d - nh:
        blk[: d - nh, : d - nh] = _haar_np(k_lo, d - nh)
    if nh:
        blk[d - nh :, d - nh :] = _haar_np(k_hi, nh)
    u = p @ blk  # f64 throughout, one cast at the end
    return ResQRotation(
        u=jnp.asarray(u, jnp.float32), evals=jnp.asarray(evals, jnp.float32), n_high=nh
    )


def rotate_weight(w, u) -> jax.Array:
    """Consumer side: ``W' = W U`` (``[out, in]``), f32 at HIGHEST."""
    return jnp.matmul(jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32), precision=HIGHEST)


def rotate_hessian(h, u) -> jax.Array:
    """Hessian of the rotated input ``x' = x U``: ``Uᵀ H U``."""
    u = jnp.asarray(u, jnp.float32)
    return jnp.matmul(
        u.T, jnp.matmul(jnp.asarray(h, jnp.float32), u, precision=HIGHEST), precision=HIGHEST
    )


# ----------------------------------------------------------------------------------------------
# Mixed-precision quantizers
# ----------------------------------------------------------------------------------------------


def mixed_act_quant(x, n_high: int, low_fmt=A_LOW, high_fmt=A_HIGH) -> jax.Array:
    """Per-token fake-quant: ``x[..., :d−n_high]`` in ``low_fmt``, ``x[..., d−n_high:]`` in
    ``high_fmt`` (asymmetric per token by default, each part with its own scale and zero)."""
    x = jnp.asarray(x, jnp.float32)
    d = x.shape[-1]
    if not 0 <= n_high <= d:
        raise ValueError(f"n_high must be in [0, {d}], got {n_high}")
    parts = []
    if d - n_high:
        parts.append(F.fake_quant(x[..., : d - n_high], low_fmt))
    if n_high:
        parts.append(F.fake_quant(x[..., d - n_high :], high_fmt))
    return jnp.concatenate(parts, axis=-1)


@functools.partial(jax.jit, static_argnames=("spec", "mse_clip"))
def _row_rtn(w, spec, mse_clip):
    _, d, z = G.fit_group(w, spec, jnp.float32(1.0), mse_clip, W_RULE)
    zz = None if z is None else z[:, None]
    c = F.quantize_blocks(w, d[:, None], zz, spec, W_RULE)
    return F.dequantize_blocks(c, d[:, None], zz, spec)


def mixed_weight_rtn(
    w, n_high: int, *, low_fmt=W_LOW, high_fmt=W_HIGH, mse_clip: bool = False
) -> jax.Array:
    """RTN of ``w [out, in]``: per-row ``low_fmt`` on the first in−n_high columns, ``high_fmt`` on
    the last n_high (formats must be per-row, group −1), with QuaRot's optional MSE clip."""
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[1]
    lo, hi = F.resolve_format(low_fmt), F.resolve_format(high_fmt)
    if lo.block != -1 or hi.block != -1:
        raise ValueError("mixed_weight_rtn needs per-row formats (group -1)")
    if not 0 <= n_high <= k:
        raise ValueError(f"n_high must be in [0, {k}], got {n_high}")
    parts = []
    if k - n_high:
        parts.append(_row_rtn(w[:, : k - n_high], lo, mse_clip))
    if n_high:
        parts.append(_row_rtn(w[:, k - n_high :], hi, mse_clip))
    return jnp.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------------------------
# Hadamard
# ----------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _paley_kind(m: int) -> str | None:
    """Paley kind of order m: "I" (m = q+1, prime q ≡ 3 mod 4), "II" (m = 2(q+1), q ≡ 1 mod 4)."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II"
    return None


def _jacobsthal(q: int) -> np.ndarray:
    chi = np.full(q, -1, np.int8)
    chi[0] = 0
    chi[(np.arange(1, q) ** 2) % q] = 1
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


@functools.lru_cache(maxsize=8)
def _paley(m: int) -> np.ndarray:
    """The unnormalized ±1 Paley Hadamard matrix of order m (int8)."""
    if _paley_kind(m) == "I":  # H = I + S, S the skew conference matrix
        s = np.zeros((m, m), np.int8)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(m - 1)
        return np.eye(m, dtype=np.int8) + s
    q = m // 2 - 1  # Paley II from the symmetric conference matrix C
    c = np.zeros((q + 1, q + 1), np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, 1], [1, -1]], np.int8)
    b = np.array([[1, -1], [-1, -1]], np.int8)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int8), b)


def hadamard_factor(n: int) -> tuple[int, int]:
    """``n = m·2^k`` with the order-m factor constructible: returns ``(2^k, m)`` (m = 1: pure
    Sylvester; otherwise m is a Paley order). Raises ValueError when no such split exists."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"Hadamard size must be a positive int, got {n!r}")
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or _paley_kind(m):
            return 1 << j, m
    raise ValueError(
        f"no Hadamard construction for size {n}: need n = m·2^k with m = 1, q+1 (prime q ≡ 3 mod "
        "4) or 2(q+1) (prime q ≡ 1 mod 4)"
    )


def hadamard_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """Orthogonal Hadamard matrix ``[n, n]`` with entries ±1/√n (H_m ⊗ Sylvester 2^k)."""
    p2, m = hadamard_factor(n)
    syl = np.ones((1, 1), np.int8)
    while syl.shape[0] < p2:
        syl = np.block([[syl, syl], [syl, -syl]])
    full = syl if m == 1 else np.kron(_paley(m), syl)
    return jnp.asarray(full / np.sqrt(n), dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
def hadamard_transform(x, axis: int = -1) -> jax.Array:
    """``y = x Hᵀ`` along ``axis`` with H = ``hadamard_matrix(n)``: a fast Walsh–Hadamard
    butterfly for the power-of-two factor and a dense ±1 matmul for the Paley factor; f32."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    n = x.shape[-1]
    p2, m = hadamard_factor(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, m, p2)
    h = 1
    while h < p2:  # butterflies on the last axis (Sylvester order)
        y = y.reshape(*lead, m, p2 // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    y = y.reshape(*lead, m, p2)
    if m > 1:
        f = jnp.asarray(_paley(m), jnp.float32)
        y = jnp.einsum("ij,...jl->...il", f, y, precision=HIGHEST)
    y = y.reshape(*lead, n) / jnp.sqrt(jnp.float32(n))
    return jnp.moveaxis(y, -1, axis)


# ----------------------------------------------------------------------------------------------
# The linear
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class ResQLinear(WeightFeatures):
    """Rotated mixed-precision projection: ``y = Q_a(x[perm] R)·Ŵᵀ (+ b)``.

    ``perm`` (an online gather, e.g. o_proj's per-head high dims moved to the end) comes first,
    then R: ``rot`` (an online ``[in, in]`` rotation, or None when it is fused upstream) and an
    online Hadamard when ``hadamard`` (down_proj). Q_a quantizes the first ``in − n_high``
    features with ``act_low`` and the last ``n_high`` with ``act_high`` (None: no act quant).

    Attributes:
      w_hat: ``[out, in]`` rotated weight (W R, mixed precision): f32 dequantized, or packed
        (``resq_quantize(pack=True)``): one ``QTensor``, or ``(q_low [out, in − n_high],
        q_high [out, n_high])``.
      rot: ``[in, in]`` f32 or None; b: ``[out]`` or None; perm: ``[in]`` int32 or None.
    """

    w_hat: object
    rot: jax.Array | None = None
    b: jax.Array | None = None
    perm: jax.Array | None = None
    n_high: int = struct.field(pytree_node=False, default=0)
    hadamard: bool = struct.field(pytree_node=False, default=False)
    act_low: object = struct.field(pytree_node=False, default=A_LOW)
    act_high: object = struct.field(pytree_node=False, default=A_HIGH)
    WEIGHT = "w_hat"  # in/out features (not a field); a tuple is column blocks

    def weights_only(self) -> ResQLinear:
        """The same linear with its mixed activation quantizer off (``act_low`` → None)."""
        return self.replace(act_low=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xr = jnp.asarray(x, jnp.float32)
        if self.perm is not None:
            xr = xr[..., self.perm]
        if self.rot is not None:
            xr = jnp.matmul(xr, self.rot, precision=HIGHEST)
        if self.hadamard:
            xr = hadamard_transform(xr)
        if self.act_low is not None:
            xr = mixed_act_quant(xr, self.n_high, self.act_low, self.act_high)
        return matmul_nt(xr, F.dense_weight(self.w_hat), self.b).astype(x.dtype)


def resq_quantize(
    w,
    rot=None,
    *,
    n_high: int = 0,
    hadamard: bool = False,
    h=None,
    mse_clip: bool = False,
    bias=None,
    w_low=W_LOW,
    w_high=W_HIGH,
    act_low=A_LOW,
    act_high=A_HIGH,
    perm=None,
    pack: bool = False,
    **gptq_kwargs,
) -> ResQLinear:
    """Rotate ``w [out, in]`` by ``rot`` (and a Hadamard) and quantize it in mixed precision.

    Args:
      rot: ``[in, in]`` rotation (``ResQRotation.u``) applied online, or None (already fused).
      n_high: number of trailing 8-bit input features (``ResQRotation.n_high``; 0: all 4-bit, as
        down_proj).
      hadamard: online Hadamard on the input (down_proj); the weight gets ``W Hᵀ``.
      h: ``[in, in]`` Hessian of the *unrotated* input for GPTQ (rotated here), None for RTN.
      mse_clip: QuaRot's MSE clip of the weight scales (on in the reference).
      act_low/act_high: activation formats (None: weight-only).
      perm: ``[in]`` online input gather applied before ``rot`` (the weight's columns and ``h``
        are permuted to match), or None.
      pack: store the weight packed (``QTensor`` s). RTN is then GPTQ under H = I, which is RTN
        exactly (a diagonal inverse factor feeds no error forward).
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    out, k = w.shape
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w contains NaN or Inf")
    if perm is not None:
        perm = jnp.asarray(perm, jnp.int32)
        if perm.shape != (k,) or not np.array_equal(np.sort(np.asarray(perm)), np.arange(k)):
            raise ValueError(f"perm must be a permutation of range({k})")
        w = w[:, perm]
        if h is not None:
            h = jnp.asarray(h, jnp.float32)[perm][:, perm]
    r = jnp.eye(k, dtype=jnp.float32)
    if rot is not None:
        rot = jnp.asarray(rot, jnp.float32)
        if rot.shape != (k, k):
            raise ValueError(f"rot must be [{k}, {k}], got shape {rot.shape}")
        r = rot
    if hadamard:
        r = hadamard_transform(r)  # R·Hᵀ: x R Hᵀ is the rotated-then-Hadamard input
    w_rot = jnp.matmul(w, r, precision=HIGHEST)
    if h is None and pack:
        h = jnp.eye(k, dtype=jnp.float32)
        r = jnp.eye(k, dtype=jnp.float32)  # H = I stays I: no rotation of the Hessian needed
    if h is not None:
        h = jnp.asarray(h, jnp.float32)
        if h.shape != (k, k):
            raise ValueError(f"h must be [{k}, {k}], got shape {h.shape}")
        hr = rotate_hessian(h, r)
        if n_high:
            res = G.gptq_quantize(
                w_rot,
                hr,
                w_low,
                high_fmt=w_high,
                n_high=n_high,
                mse_clip=mse_clip,
                int_rule=W_RULE,
                **gptq_kwargs,
            )
        else:
            res = G.gptq_quantize(
                w_rot, hr, w_low, mse_clip=mse_clip, int_rule=W_RULE, **gptq_kwargs
            )
        w_hat = res.qtensor if pack else res.w_hat
    else:
        w_hat = mixed_weight_rtn(w_rot, n_high, low_fmt=w_low, high_fmt=w_high, mse_clip=mse_clip)
    b = None if bias is None else jnp.asarray(bias)
    return ResQLinear(
        w_hat=w_hat,
        rot=rot,
        b=b,
        perm=perm,
        n_high=int(n_high),
        hadamard=bool(hadamard),
        act_low=act_low,
        act_high=act_high,
    )
