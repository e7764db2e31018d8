"""The pluggable linear interface.

Every projection of a model (q, k, v, o, gate, up, down, and an untied lm_head) is a pytree object
with ``__call__(x) -> y``: ``x`` is ``[..., in_features]`` in the compute dtype and ``y`` is
``[..., out_features]`` in the same dtype. The model code never looks inside a linear, so a
quantized linear (fake-quant, packed, Pallas kernel) replaces a ``Dense`` without touching it.

Weights are kept in the Hugging Face layout ``W[out, in]``: quantization blocks run along ``in``
(the contraction axis), exactly as in the checkpoint files.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from arhq_jax.elements import HIGHEST


@runtime_checkable
class Linear(Protocol):
    """Anything a model can call as a projection."""

    def __call__(self, x: jax.Array) -> jax.Array: ...

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...


def matmul_nt(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The matmul of every linear: ``x [..., K] · w [N, K]ᵀ (+ bias [N])`` → f32 ``[..., N]``.

    f32 accumulation whatever the input dtypes, ``Precision.HIGHEST`` so that GPU f32 is not
    silently TF32; the bias is added in f32 after the product."""
    y = jnp.einsum(
        "...k,nk->...n",
        x,
        w,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


@struct.dataclass
class Dense:
    """A float linear: ``y = x Wᵀ (+ b)``.

    Attributes:
      w: ``[out, in]``, the parameter dtype (f32 or bf16).
      b: ``[out]`` or None.
    """

    w: jax.Array
    b: jax.Array | None = None

    @property
    def in_features(self) -> int:
        return self.w.shape[1]

    @property
    def out_features(self) -> int:
        return self.w.shape[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul_nt(x, self.w.astype(x.dtype), self.b).astype(x.dtype)
