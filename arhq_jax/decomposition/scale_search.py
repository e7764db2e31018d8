"""Searched NVFP4 block scales: the stored E4M3 scale of each 16-element block chosen
to minimise the block's (weighted) squared error, instead of the amax rule s = E4M3(gs · a/6).

The amax rule maps each block's largest magnitude onto the top FP4 value 6; a smaller scale
clips that element but refines the grid of the others, a larger one (up to "a ↦ 4", the
four-over-six choice) moves the coarse top step 4 → 6 off the largest values. The decoder reads
only the stored E4M3 scale, so any choice is a valid NVFP4 tensor (compressed-tensors, vLLM):
the search changes values, not the format.

Candidates are the E4M3 codes ``c₀ + k`` for ``k ∈ SEARCH_STEPS`` around the amax rule's code
c₀ (positive E4M3 codes are ordered by value: consecutive codes are consecutive scales, eight
per octave), clipped to the finite positive codes 1…0x7E (0x7E = 448). The amax code itself is
the first candidate and a candidate replaces the best only when its error is strictly lower,
so the result is never worse than the amax rule under the same weights, and equals the brute
force minimum over the window (tests/decomposition/test_scale_search.py). An all-zero block (every
error 0)
and a non-finite one (NaN errors, which compare false) therefore keep the amax rule's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arhq_jax.numerics import formats as F

SEARCH_STEPS = tuple(k for k in range(-4, 6) if k)  # the amax code c₀ is tried first
_E4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN


def candidate_codes(code0: jax.Array) -> jax.Array:
    """E4M3 codes ``[..., len(SEARCH_STEPS)]`` (uint8) tried after the amax codes ``code0``."""
    c = code0.astype(jnp.int32)[..., None] + jnp.asarray(SEARCH_STEPS, jnp.int32)
    return jnp.clip(c, 1, _E4M3_MAX_CODE).astype(jnp.uint8)


def block_error(xb, scale, spec: F.FormatSpec, tensor_scale, weights=None) -> jax.Array:
    """``Σ_j w_j (deq(Q(x_j; s)) − x_j)²`` per block: xb ``[..., nb, 16]`` f32, scale
    ``[..., nb]`` float8_e4m3fn, weights broadcasting against xb (None: 1)."""
    d = F.scale_multiplier(scale, spec, tensor_scale)
    q = F.dequantize_blocks(F.quantize_blocks(xb, d, None, spec), d, None, spec)
    e = jnp.square(q - xb)
    if weights is not None:
        e = e * weights
    return jnp.sum(e, axis=-1)


def search_scales(xb, spec: F.FormatSpec, tensor_scale, weights=None):
    """NVFP4 ``block_params`` with searched scales: ``(scale [..., nb] float8_e4m3fn, d [..., nb,
    1] f32)`` for f32 blocks ``xb [..., nb, 16]`` under the fixed tensor scale (``gs`` "ct",
    ``g`` "modelopt") and per-element ``weights`` (e.g. GPTQ's 1/U_jj², broadcasting against
    xb; None: plain squared error)."""
    if spec.name != "nvfp4":
        raise ValueError(f"the block-scale search is for nvfp4, not {spec.label}")
    xb = jnp.asarray(xb, jnp.float32)
    g = jnp.asarray(tensor_scale, jnp.float32)
    scale0, _, _ = F.block_params(xb, spec, g)
    code0 = jax.lax.bitcast_convert_type(scale0, jnp.uint8)
    cands = jax.lax.bitcast_convert_type(candidate_codes(code0), jnp.float8_e4m3fn)
    best_s, best_e = scale0, block_error(xb, scale0, spec, g, weights)
    for k in range(cands.shape[-1]):
        s = cands[..., k]
        e = block_error(xb, s, spec, g, weights)
        better = e < best_e
        best_s = jnp.where(better, s, best_s)
        best_e = jnp.where(better, e, best_e)
    return best_s, F.scale_multiplier(best_s, spec, g)
