"""The pluggable linear interface.

Every projection of a model (q, k, v, o, gate, up, down, and an untied lm_head) is a pytree object
with ``__call__(x) -> y``: ``x`` is ``[..., in_features]`` in the compute dtype and ``y`` is
``[..., out_features]`` in the same dtype. The model code never looks inside a linear, so a
quantized linear (fake-quant, packed, Pallas kernel) replaces a ``Dense`` without touching it.

Weights are kept in the Hugging Face layout ``W[out, in]``: quantization blocks run along ``in``
(the contraction axis), exactly as in the checkpoint files.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from arhq_jax.numerics.elements import HIGHEST


@runtime_checkable
class Linear(Protocol):
    """Anything a model can call as a projection."""

    def __call__(self, x: jax.Array) -> jax.Array: ...

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...


def _dot(subscripts: str, x: jax.Array, w: jax.Array) -> jax.Array:
    # The one precision policy of the linears: f32 accumulation whatever the input dtypes, and
    # Precision.HIGHEST so that GPU f32 is not silently TF32.
    return jnp.einsum(subscripts, x, w, precision=HIGHEST, preferred_element_type=jnp.float32)


def add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``y [..., N]`` (f32) ``+ bias [N]`` in f32; ``y`` itself when ``bias`` is None."""
    return y if bias is None else y + bias.astype(jnp.float32)


def matmul_nt(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The matmul of every linear: ``x [..., K] · w [N, K]ᵀ (+ bias [N])`` → f32 ``[..., N]``;
    the bias is added in f32 after the product."""
    return add_bias(_dot("...k,nk->...n", x, w), bias)


def lowrank_branch(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The low-rank branch ``(x [..., K] · a [K, r]) · b [N, r]ᵀ`` → f32 ``[..., N]`` (factors
    upcast to f32, both products at the linears' precision)."""
    t = _dot("...k,kr->...r", x, a.astype(jnp.float32))
    return matmul_nt(t, b.astype(jnp.float32))


def weight_shape(w) -> tuple[int, int]:
    """``(out, in)`` of a linear's weight field: an array or a ``QTensor`` ``[out, in]`` (its
    true shape), or a tuple of them, column blocks ``[out, in_i]`` side by side."""
    if isinstance(w, tuple):
        return w[0].shape[0], sum(q.shape[1] for q in w)
    return w.shape[0], w.shape[1]


class WeightFeatures:
    """Mixin of a linear dataclass whose weight field (named by ``WEIGHT``) is ``[out, in]``:
    ``in_features`` and ``out_features`` from its shape (see ``weight_shape``), stated once."""

    WEIGHT: ClassVar[str] = "w"

    @property
    def in_features(self) -> int:
        return weight_shape(getattr(self, self.WEIGHT))[1]

    @property
    def out_features(self) -> int:
        return weight_shape(getattr(self, self.WEIGHT))[0]


@struct.dataclass
class Dense(WeightFeatures):
    """A float linear: ``y = x Wᵀ (+ b)``.

    Attributes:
      w: ``[out, in]``, the parameter dtype (f32 or bf16).
      b: ``[out]`` or None.
    """

    w: jax.Array
    b: jax.Array | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul_nt(x, self.w.astype(x.dtype), self.b).astype(x.dtype)
