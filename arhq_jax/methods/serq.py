"""SERQ (arXiv 2603.08185; acalabys/SERQ; docs/spec/methods.md §7): flattening, saliency
permutation and a
single quantized compensation matrix on the most salient input channels.

    s      = max(|min_j|, |max_j|)                       per input channel (calibration)
    order  = argsort(s) descending                       r = 128 most salient channels first
    W̃      = (W diag(s))[:, order],   x̃ = (x / s)[order]
    C      = Q_C(W̃[:, :r])                               int4 sym per output row, or MXFP4
    W̃[:, :r] ← W̃[:, :r] − C                              group 0 then holds only the residual
    W_main = Q_w(W̃)                                      RTN or GPTQ (on H of x̃), or MXFP4
    y      = a·W_mainᵀ + a[:, :r]·Cᵀ,   a = Q_a(x̃)       both GEMMs read the SAME quantized a

Faithfulness (checked against ``serq_quant/int_quant.py`` and ``utils/gptq_utils.py``):
  - Follows the code: s is the absmax (SmoothQuant α = 1, no weight term); C uses SERQ's
    sign-magnitude per-row int4 (range [−7, 7], ``sign_magnitude=True``); the int main weight uses
    the QuaRot/GPTQ quantizer (int4 sym g128, scale clamp ≥ 1e-5, ``int_rule="gptq"``) for both
    RTN and GPTQ; GPTQ runs on the flattened, permuted, unquantized input's Hessian with no
    act-order (refused); the int activation quantizer is SERQ's ``AsymPerGroupQuant``: per token,
    groups of 128, range [min, max] *not* widened to 0, z = RNE(−min/scale) unclamped,
    q = clip(RNE(x/scale) + z, 0, 2^b − 1), an all-zero group uses [−1, 1]. MXFP4 uses the OCP
    floor rule of ``formats`` (SERQ's simulation adds f32 eps to the block max first; the CUDA
    kernel uses the ceil rule).
  - Differs (guards for cases where the reference divides by zero): a zero channel absmax gets
    s = 1 (the reference raises); a constant non-zero activation group widens its range to
    include 0; a width that is not a multiple of 128 pads each token's last group by repeating
    its last element (min/max unchanged; the reference requires divisibility). Flattening and the
    permutation are applied online, as in the code (the paper folds them).
  - Extension (not in SERQ): an NVFP4 path built like the MXFP4 one (C, main weight and
    activations in NVFP4), for comparisons in NVFP4 W4A4; its activation tensor scale is static
    (calibrated, ``serq_input_amax``) in the pipeline by default, or dynamic per call.
  - Storage: ``pack=True`` keeps W_main and C as packed ``QTensor`` s (what the pipeline saves).

Statistics needed from calibration: per-channel min and max of the linear's input (one pass of the
unquantized model), and for GPTQ the Hessian H of the *original* input (``serq_hessian`` maps it
to x̃ exactly) or of x̃ directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from arhq_jax.linears.base import WeightFeatures, add_bias, matmul_nt
from arhq_jax.methods.gptq import gptq_quantize
from arhq_jax.numerics import formats as F

C_INT_FMT = F.resolve_format("int4", group_size=-1, sign_magnitude=True)
MAIN_INT_FMT = F.resolve_format("int4", group_size=128)
MAIN_INT_RULE = "gptq"  # the int main weight's scale rule (QuaRot/GPTQ's), RTN and GPTQ alike
ACT_GROUP = 128


# ----------------------------------------------------------------------------------------------
# Flattening and permutation
# ----------------------------------------------------------------------------------------------


def serq_flatten_scale(act_min, act_max) -> jax.Array:
    """``s = max(|min|, |max|)`` ``[in]`` f32 (1 where the channel never fired)."""
    lo, hi = jnp.asarray(act_min, jnp.float32), jnp.asarray(act_max, jnp.float32)
    if lo.ndim != 1 or lo.shape != hi.shape:
        raise ValueError(
            f"act_min/act_max must be matching [in] vectors, got {lo.shape}, {hi.shape}"
        )
    if not bool(jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi))):
        raise ValueError("act_min/act_max contain NaN or Inf")
    s = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return jnp.where(s > 0, s, 1.0)


def serq_order(s) -> jax.Array:
    """Saliency order ``argsort(s)`` descending (stable), int32 ``[in]``."""
    return jnp.argsort(jnp.asarray(s), stable=True, descending=True).astype(jnp.int32)


def serq_transform(w, s, perm) -> jax.Array:
    """``W̃ = (W diag(s))[:, perm]`` f32 ``[out, in]``."""
    w = jnp.asarray(w, jnp.float32)
    return (w * jnp.asarray(s, jnp.float32)[None, :])[:, perm]


def serq_input(x, s, perm) -> jax.Array:
    """``x̃ = (x / s)[..., perm]`` in f32."""
    return F.div(x, jnp.asarray(s, jnp.float32))[..., perm]


def serq_input_amax(act_min, act_max) -> jax.Array:
    """Exact amax of ``serq_input`` over the calibration tokens with these per-channel min/max
    (f32 scalar): division by a positive s is monotone, so it is ``max_j div(max|x_j|, s_j)``
    (1 when any channel fired, since s is that max)."""
    lo, hi = jnp.asarray(act_min, jnp.float32), jnp.asarray(act_max, jnp.float32)
    m = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return jnp.max(F.div(m, serq_flatten_scale(act_min, act_max)))


def serq_hessian(h, s, perm) -> jax.Array:
    """Hessian of x̃ from the Hessian of x: ``(H / (s sᵀ))[perm][:, perm]`` (exact)."""
    h = jnp.asarray(h, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    return (h / (s[:, None] * s[None, :]))[perm][:, perm]


def serq_compensate(w_t, r: int, c_fmt=C_INT_FMT):
    """Split ``W̃ [out, in]``: ``(W_res, C)`` with ``C = Q_C(W̃[:, :r]) [out, r]`` and ``W_res`` =
    W̃ with ``W̃[:, :r] − C`` in its first r columns (not yet quantized). ``W_res + [C, 0] = W̃``."""
    w_t = jnp.asarray(w_t, jnp.float32)
    if r == 0:
        return w_t, jnp.zeros((w_t.shape[0], 0), jnp.float32)
    c = F.fake_quant(w_t[:, :r], c_fmt)
    return w_t.at[:, :r].add(-c), c


# ----------------------------------------------------------------------------------------------
# Activation quantizer
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def serq_act_quant(x, bits: int = 4, group: int = ACT_GROUP) -> jax.Array:
    """SERQ's asymmetric per-token group fake-quant (``AsymPerGroupQuant``) of ``x[..., K]``."""
    x = jnp.asarray(x, jnp.float32)
    k = x.shape[-1]
    kp = -(-k // group) * group
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kp - k)], mode="edge")
    xb = xp.reshape(*x.shape[:-1], kp // group, group)
    qmax = 2**bits - 1
    hi = jnp.max(xb, axis=-1, keepdims=True)
    lo = jnp.min(xb, axis=-1, keepdims=True)
    zero_grp = (hi == 0) & (lo == 0)
    const = (hi == lo) & ~zero_grp  # guard: the reference would divide by zero
    lo = jnp.where(zero_grp, -1.0, jnp.where(const, jnp.minimum(lo, 0.0), lo))
    hi = jnp.where(zero_grp, 1.0, jnp.where(const, jnp.maximum(hi, 0.0), hi))
    # F.div: a true f32 division (XLA rewrites x / broadcast(y) as x·(1/y), an ulp off at ties).
    scale = F.div(hi - lo, qmax)
    z = jnp.round(F.div(-lo, scale))
    q = jnp.clip(jnp.round(F.div(xb, scale)) + z, 0, qmax)
    return ((q - z) * scale).reshape(*x.shape[:-1], kp)[..., :k]


ACTS = ("int4", "int8", "mxfp4", "nvfp4")
FP4_PATHS = ("mxfp4", "nvfp4")


def _act_quant(x, act: str | None, tensor_scale=None):
    if act is None:
        return x
    if act in FP4_PATHS:
        return F.fake_quant(x, act, tensor_scale=tensor_scale)
    return serq_act_quant(x, bits=4 if act == "int4" else 8)


# ----------------------------------------------------------------------------------------------
# The linear
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class SERQLinear(WeightFeatures):
    """SERQ projection: ``y = Q_a(x̃)·W_mainᵀ + Q_a(x̃)[..., :r]·Cᵀ (+ b)``, x̃ = (x/s)[perm].

    Attributes:
      s: ``[in]`` f32 flattening scale; perm: ``[in]`` int32 saliency order.
      w_main: ``[out, in]`` main weight (permuted, flattened, compensated): f32 dequantized, or
        the packed ``QTensor`` (``serq_quantize(pack=True)``).
      c: ``[out, r]`` compensation matrix, f32 dequantized or a packed ``QTensor``.
      b: ``[out]`` or None.
      act_scale: static nvfp4 activation global scale (f32 scalar) or None (dynamic).
      act: static activation quantizer: "int4", "int8" (SERQ asym per-token g128), "mxfp4",
        "nvfp4" (the NVFP4 extension), or None (weight-only).
    """

    s: jax.Array
    perm: jax.Array
    w_main: jax.Array
    c: jax.Array
    b: jax.Array | None = None
    act_scale: jax.Array | None = None
    act: str | None = struct.field(pytree_node=False, default="int4")
    WEIGHT = "w_main"  # in/out features (not a field)

    @property
    def rank(self) -> int:
        return self.c.shape[1]

    def weights_only(self) -> SERQLinear:
        """The same linear with its activation quantizer off (the static scale is kept)."""
        return self.replace(act=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = _act_quant(serq_input(x, self.s, self.perm), self.act, self.act_scale)
        y = matmul_nt(a, F.dense_weight(self.w_main))
        if self.rank:  # the same quantized a
            y = y + matmul_nt(a[..., : self.rank], F.dense_weight(self.c))
        return add_bias(y, self.b).astype(x.dtype)


def serq_quantize(
    w,
    act_min,
    act_max,
    *,
    path: str = "int",
    r: int = 128,
    w_quant: str = "rtn",
    h=None,
    act: str | None = "default",
    w_fmt=None,
    bias=None,
    pack: bool = False,
    act_scale=None,
    **gptq_kwargs,
) -> SERQLinear:
    """Build a ``SERQLinear`` from ``w [out, in]`` and the input's per-channel min/max.

    Args:
      path: ``"int"`` (C int4 sym per row; main int4 sym g128 by RTN or GPTQ), ``"mxfp4"``
        (C and main MXFP4 by RTN, no GPTQ) or ``"nvfp4"`` (the same with NVFP4: an extension for
        comparisons in NVFP4, not in the paper).
      r: number of salient channels compensated (128; 0 disables the compensation).
      w_quant: ``"rtn"`` or ``"gptq"`` (int path only; needs ``h``).
      h: ``[in, in]`` Hessian of the *original* input x (mapped to x̃ by ``serq_hessian``).
      act: ``"default"`` (int4 for the int path, the path's format for the FP4 paths), "int4",
        "int8" (W4A8), "mxfp4", "nvfp4", or None.
      w_fmt: main weight format override (int path; default int4 sym g128, QuaRot quantizer).
      bias: ``[out]`` or None. ``gptq_kwargs`` go to ``gptq_quantize`` (percdamp, block_size…).
      pack: store ``w_main`` and ``c`` as packed ``QTensor`` s (dequantizing them gives the f32
        arrays of ``pack=False`` bit for bit).
      act_scale: static nvfp4 activation global scale (nvfp4 activations only; e.g.
        ``global_scales.act_scale(serq_input_amax(act_min, act_max))``); None: dynamic.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    out, k = w.shape
    s = serq_flatten_scale(act_min, act_max)
    if s.shape != (k,):
        raise ValueError(f"act_min/act_max must be [{k}], got {s.shape}")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w contains NaN or Inf")
    if path not in ("int", *FP4_PATHS):
        raise ValueError(f"path must be 'int', 'mxfp4' or 'nvfp4', got {path!r}")
    if not (isinstance(r, int) and 0 <= r <= k):
        raise ValueError(f"r must be an int in [0, in={k}], got {r!r}")
    if w_quant not in ("rtn", "gptq"):
        raise ValueError(f"w_quant must be 'rtn' or 'gptq', got {w_quant!r}")
    if act == "default":
        act = "int4" if path == "int" else path
    if act is not None and act not in ACTS:
        raise ValueError(f"act must be one of {ACTS} or None, got {act!r}")
    if act_scale is not None:
        if act != "nvfp4":
            raise ValueError(f"act_scale applies to nvfp4 activations only, not {act}")
        act_scale = jnp.asarray(act_scale, jnp.float32).reshape(())
    if gptq_kwargs.get("act_order"):
        raise ValueError("SERQ never combines GPTQ act-order with its saliency permutation")
    if path in FP4_PATHS and (w_quant != "rtn" or w_fmt is not None):
        raise ValueError(
            f"the {path.upper()} path quantizes C and the main weight with {path.upper()} RTN only"
        )
    perm = serq_order(s)
    w_t = serq_transform(w, s, perm)
    c_fmt = C_INT_FMT if path == "int" else F.resolve_format(path)
    w_res, c = serq_compensate(w_t, r, c_fmt)
    if pack and r:
        c = F.quantize(w_t[:, :r], c_fmt)  # dequantize(quantize) == fake_quant bit for bit
    main_fmt = F.resolve_format(w_fmt if w_fmt is not None else MAIN_INT_FMT)
    if path in FP4_PATHS:
        main_fmt = F.resolve_format(path)
    rule = MAIN_INT_RULE if main_fmt.is_int else "default"
    if w_quant == "gptq":
        if h is None:
            raise ValueError("w_quant='gptq' needs h, the [in, in] Hessian of the input")
        h = jnp.asarray(h, jnp.float32)
        if h.shape != (k, k):
            raise ValueError(f"h must be [{k}, {k}], got shape {h.shape}")
        res = gptq_quantize(w_res, serq_hessian(h, s, perm), main_fmt, int_rule=rule, **gptq_kwargs)
        w_main = res.qtensor if pack else res.w_hat
    else:
        quant = F.quantize if pack else F.fake_quant
        w_main = quant(w_res, main_fmt, int_rule=rule)
    b = None if bias is None else jnp.asarray(bias)
    if b is not None and b.shape != (out,):
        raise ValueError(f"bias must be [{out}], got shape {b.shape}")
    return SERQLinear(s=s, perm=perm, w_main=w_main, c=c, b=b, act_scale=act_scale, act=act)


def serq_effective_bits(in_features: int, r: int = 128, path: str = "int", w_fmt=None) -> float:
    """Stored weight bits per element of W: main format + (r/in)·(bits of C per element)."""
    if path in FP4_PATHS:
        main, c_bits = F.bits_per_element(path), F.bits_per_element(path)
    else:
        main = F.bits_per_element(w_fmt if w_fmt is not None else MAIN_INT_FMT, in_features)
        c_bits = F.bits_per_element(C_INT_FMT, r) if r else 0.0
    return main + (r / in_features) * c_bits
