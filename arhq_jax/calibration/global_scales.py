"""NVFP4 global (tensor) scales fixed at quantization time: static activation scales and the
weight scale shared by fused partitions.

Serving engines (vLLM with compressed-tensors NVFP4) quantize activations with a *static*
per-linear ``input_global_scale`` calibrated offline and dynamic per-16 block scales, and store one
weight global scale for the fused q/k/v and gate/up partitions. These helpers compute both from
measured maxima, and only through ``formats.nvfp4_tensor_scale`` (whatever convention that
function uses for g, every consumer reads g through ``formats``).

Exactness: the activation quantizer of a smoothed linear sees ``x_s = f32(x) · fl32(1/s)``
(``qlinear.smooth_input``). Rounding is monotone, so
``max_t |fl(x_tj · c_j)| = fl(max_t |x_tj| · c_j)`` and the amax of x_s over the calibration
tokens is ``max_j fl(absmax_j · fl32(1/s_j))``, exactly, from the per-channel absmax of x: no
second pass over the data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arhq_jax.linears.quantized import smooth_reciprocal
from arhq_jax.numerics import formats


def amax(absmax) -> jnp.ndarray:
    """max over channels of a per-channel absmax ``[D]`` (any float dtype) → f32 scalar."""
    return jnp.max(jnp.asarray(absmax).astype(jnp.float32))


def smoothed_amax(absmax, smooth=None) -> jnp.ndarray:
    """Exact amax of ``smooth_input(x, smooth)`` over the tokens whose per-channel max|x| is
    ``absmax [D]`` (f32 scalar; see the module doc). ``smooth=None``: the amax of x itself."""
    a = jnp.asarray(absmax).astype(jnp.float32)
    if smooth is not None:
        a = a * smooth_reciprocal(jnp.asarray(smooth))
    return jnp.max(a)


def act_scale(amax_value) -> jnp.ndarray:
    """The static nvfp4 activation global scale of an input whose amax is ``amax_value`` (f32
    scalar; ``formats.nvfp4_tensor_scale`` of it, its fallback when the amax is 0)."""
    return formats.nvfp4_tensor_scale(jnp.asarray(amax_value, jnp.float32).reshape(1))


def joint_weight_scale(weights) -> jnp.ndarray:
    """One nvfp4 weight global scale for several partitions ``[out_i, in]`` (f32 scalar):
    ``formats.nvfp4_tensor_scale`` of the largest amax over all of them."""
    m = [jnp.max(jnp.abs(jnp.asarray(w).astype(jnp.float32))) for w in weights]
    if len({frozenset(x.devices()) for x in m}) > 1:
        # partitions decomposed on different devices (arhq_jax.parallel.devices): a max is exact on
        # host
        m = jax.device_get(m)
    return formats.nvfp4_tensor_scale(jnp.stack(m))


def fused_weight_scales(residuals: dict, group_of: dict, enabled: bool) -> dict:
    """``{proj: joint scale}`` over the projections of each input group in ``residuals``
    (``{proj: [out, in]}``); ``{}`` when not ``enabled``. Groups of one projection get the scale
    that projection would have on its own."""
    if not enabled:
        return {}
    by_group: dict = {}
    for p in residuals:
        by_group.setdefault(group_of[p], []).append(p)
    out = {}
    for ps in by_group.values():
        ts = joint_weight_scale([residuals[p] for p in ps])
        out.update({p: ts for p in ps})
    return out
