"""Block-Hadamard rotations of a linear's input, combined with the low-rank branch.

A projection ``y = x Wᵀ`` is unchanged by any orthogonal R: ``y = (x R)(W R)ᵀ``. With
``R = blockdiag(H_b, …, H_b)`` (``H_b`` the normalised Sylvester Hadamard matrix of size b, a power
of two dividing ``in``) the rotation spreads each channel's outliers over its block of b channels
before the activation quantizer, QuaRot/ResQ style. Here it is applied *online* to the input of
each quantized projection (``RotatedLinear``) and folded into the weight offline (``W R``); the
calibration statistics (G = EᵀE/N, H = XᵀX/N) are measured on ``x R``, so ARHQ, GPTQ and the
joint refinement run unchanged in the rotated space, and the branch ``(x R) A Bᵀ`` reads the
unquantized rotated input (its A could absorb R: ``A' = R A`` reads x itself).

Folding the rotation of o_proj's input into v_proj's output rows is possible when b divides
head_dim (the rotation acts within each head and commutes with attention); that deployment
optimisation is not done here (the numerics are the same up to rounding of v_proj).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arhq_jax.numerics.elements import HIGHEST


def _check_block(n: int, block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"rotation block must be a positive int, got {block!r}")
    if block & (block - 1):
        raise ValueError(f"rotation block must be a power of two, got {block}")
    if n % block:
        raise ValueError(f"rotation block {block} does not divide the {n} input channels")


def block_for(n: int, block: int) -> int:
    """The rotation block used for an input of ``n`` channels when ``block`` is asked: the
    largest power of two <= ``block`` that divides n (SmolLM2: 64 for its 576-wide inputs)."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"rotation block must be a positive int, got {block!r}")
    b = 1
    while b * 2 <= block and n % (b * 2) == 0:
        b *= 2
    return b


def hadamard(block: int, dtype=jnp.float32) -> jax.Array:
    """The normalised Sylvester Hadamard matrix ``[b, b]`` (entries ±1/√b; symmetric,
    orthogonal)."""
    return jnp.asarray(_sylvester(block), dtype)


def _sylvester(block: int) -> np.ndarray:
    _check_block(block, block)
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(block)


def rotation_matrix(n: int, block: int, dtype=jnp.float32) -> jax.Array:
    """The dense ``[n, n]`` block-diagonal rotation R (for tests and references)."""
    _check_block(n, block)
    return jnp.asarray(np.kron(np.eye(n // block), _sylvester(block)), dtype)


def rotate(x: jax.Array, block: int) -> jax.Array:
    """``x R`` along the last axis: ``[..., n]`` → ``[..., n]`` in f32 (f64 stays f64).

    Costs n·b multiply-adds per token (a dense b×b matmul per block, HIGHEST precision)."""
    x = jnp.asarray(x)
    n = x.shape[-1]
    _check_block(n, block)
    if block == 1:
        return x.astype(jnp.result_type(x.dtype, jnp.float32))
    cd = jnp.result_type(x.dtype, jnp.float32)
    h = hadamard(block, cd)
    xb = x.astype(cd).reshape(*x.shape[:-1], n // block, block)
    return jnp.einsum("...gi,ij->...gj", xb, h, precision=HIGHEST).reshape(x.shape)


def rotate_weight(w: jax.Array, block: int) -> jax.Array:
    """``W R`` for ``W [out, in]`` (the input axis rotated), so ``(x R)(W R)ᵀ = x Wᵀ``."""
    return rotate(w, block)


def rotate_gram(m: jax.Array, block: int) -> jax.Array:
    """``Rᵀ M R`` for a ``[n, n]`` second moment of x (e.g. H = XᵀX/N → that of x R).

    Exact for H; *not* for G = EᵀE/N, whose quantizer is nonlinear (measure G on x R)."""
    return rotate(rotate(m, block).T, block).T


@struct.dataclass
class RotatedLinear:
    """``y = inner(x R)``: an online block-Hadamard rotation before a (quantized) linear whose
    weight was rotated offline (``W R``). Satisfies ``arhq_jax.linears.base.Linear``.

    Attributes:
      inner: the linear of the rotated space (a ``QuantLinear``).
      block: (static) Hadamard block size b.
    """

    inner: object
    block: int = struct.field(pytree_node=False, default=16)

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        # The rotated input stays f32 (a bf16 round trip would add error before Q_a).
        return self.inner(rotate(x, self.block)).astype(x.dtype)
