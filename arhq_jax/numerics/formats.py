"""Number formats: nvfp4, nvfp4-paper, mxfp4, int4/int8 (docs/spec/formats.md, bit for bit).

Blocks run along the contraction axis K: ``quantize(x, fmt, axis)`` moves ``axis`` to the end. All
arithmetic is float32 from a float32 upcast of the input.

Layers of this module, from the bottom up:

* element codecs (defined in ``arhq_jax.numerics.elements``, re-exported here): ``e2m1_encode``
(RNE),
  ``e2m1_encode_ties_down``, ``e2m1_decode``, ``pack_nibbles`` / ``unpack_nibbles`` (element 2i
  in the low nibble), ``div`` (correctly rounded f32 division: XLA rewrites x / broadcast(y)
  as x * (1/y), so every division here goes through it);
* block pieces, on f32 blocks ``xb[..., nblocks, B]``: ``block_params`` (stored scale, f32 decode
  multiplier ``d[..., nblocks, 1]``, zero point), ``quantize_blocks`` and ``dequantize_blocks``;
  GPTQ fits a group once with ``block_params`` and quantizes column by column with the others;
* the array API: ``fake_quant``, ``quantize`` -> ``QTensor``, ``dequantize``.

nvfp4 has two tensor-scale conventions (``FormatSpec.convention``, docs/formats.md): "nvfp4" is
compressed-tensors' (the tensor scale is the encode global scale gs = 2688/amax, the block decode
is fl(s / gs); what the exported checkpoint holds and compressed-tensors/vLLM decode), and
"nvfp4-modelopt" is ModelOpt's and docs/spec/formats.md §3's (the tensor scale is the decode
multiplier
g = amax/2688, the block decode is fl(s · g); bit-identical with ModelOpt's reference). Both have
``spec.name == "nvfp4"``.

Non-finite values: a NaN or ±Inf anywhere in a block makes the whole dequantized block NaN (its
stored scale is NaN: e4m3 0x7F, e8m0 0xFF, f32 NaN), and the nvfp4 tensor maximum ignores them.
``quantize`` called eagerly rejects them with a ValueError instead.

Subnormal f32 values: XLA flushes them to zero (DAZ/FTZ) on CPU and GPU, so inputs below 2^-126
count as 0. mxfp4's clamped exponent -127 (blocks with max below 2^-124) is handled with normal
powers of two, so only results that are themselves subnormal are flushed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arhq_jax.numerics.elements import (
    E2M1_VALUES,
    PAPER_CODEBOOK,
    PAPER_INDEX_TO_CODE,
    div,
    e2m1_decode,
    e2m1_encode,
    e2m1_encode_ties_down,
    e2m1_ties_down_index,
    exponent,
    pack_nibbles,
    pow2,
    unpack_nibbles,
)

FORMAT_NAMES = ("nvfp4", "nvfp4-paper", "mxfp4", "int4", "int8")
# Extra names: each resolves to a FORMAT_NAMES entry with fixed options.
_ALIASES = {
    "int4-asym": ("int4", {"symmetric": False}),
    "int8-asym": ("int8", {"symmetric": False}),
    "nvfp4-modelopt": ("nvfp4", {"convention": "modelopt"}),
}
# How an encoder fits the per-block scale (and zero point) of an int format: a choice of the
# method that quantizes, not part of the format (decoding never reads it). "default"
# (docs/spec/formats.md §6); "gptq": GPTQ/QuaRot's reference quantizer, the range (amax, or
# hi − lo) clamped at >= 1e-5; "fprag" (asymmetric only): FPRAG/AWQ's, no widening of [lo, hi] to
# 0, scale >= 1e-8, round-to-nearest-even after adding the zero point.
INT_RULES = ("default", "gptq", "fprag")
# nvfp4 tensor-scale conventions (docs/formats.md): "ct" = compressed-tensors (the default, what
# the exported nvfp4-pack-quantized checkpoint holds), "modelopt" = ModelOpt / docs/spec/formats.md
# §3
# (bit-identical with ModelOpt's reference and docs/spec/formats.md §10 vectors).
NVFP4_CONVENTIONS = ("ct", "modelopt")

E4M3_MAX = 448.0
NVFP4_TENSOR_DIVISOR = 2688.0  # 6 * 448
F32_TINY = float(np.finfo(np.float32).tiny)  # 2^-126
CT_ZERO_BLOCK_SCALE = 0.125  # compressed-tensors' placeholder for a block scale that rounds to 0
_PAPER_FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------
# FormatSpec
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """A fully resolved number format (frozen and hashable: a valid static jit argument).

    Attributes:
      name: one of FORMAT_NAMES ("int4"/"int8" cover both symmetric and asymmetric).
      bits: element bits, 4 or 8.
      block: elements per scale along K: 16 (nvfp4, nvfp4-paper), 32 (mxfp4), the group size for
        int formats (default 128; -1 = the whole axis).
      symmetric: int formats only; False = asymmetric with uint8 zero points.
      tile: None, or (16, 16) for nvfp4-paper weights (16 rows x 16 columns share a scale).
      scale_rule: mxfp4 scale exponent rule, "floor" (OCP MX, default) or "ceil" (SERQ kernel).
      sign_magnitude: symmetric int only; codes are sign-magnitude (sign bit, then |q|), so the
        range is [-2^(b-1)+1, 2^(b-1)-1] (SERQ's quantizers, docs/spec/formats.md §6).
      convention: nvfp4 only (None elsewhere): "ct" (default; compressed-tensors: the tensor scale
        is the encode global scale gs = 2688/amax, decode d = fl(s / gs), placeholder scale 0.125
        for blocks whose scale rounds to 0, -0.0 encodes as 0x0) or "modelopt"
        (docs/spec/formats.md §3: the
        tensor scale is the decode multiplier g = amax/2688, d = fl(s · g), flushed blocks store 0).
        Resolve "nvfp4-modelopt" for the latter; its label is "nvfp4-modelopt".
    """

    name: str
    bits: int
    block: int
    symmetric: bool = True
    tile: tuple[int, int] | None = None
    scale_rule: str = "floor"
    sign_magnitude: bool = False
    convention: str | None = None

    def __post_init__(self):
        if self.name == "nvfp4":
            if self.convention is None:
                object.__setattr__(self, "convention", "ct")
            if self.convention not in NVFP4_CONVENTIONS:
                raise ValueError(
                    f"nvfp4 convention must be one of {NVFP4_CONVENTIONS}, got {self.convention!r}"
                )
        elif self.convention is not None:
            raise ValueError(f"convention applies to nvfp4 only, not {self.name}")
        if self.name not in FORMAT_NAMES:
            raise ValueError(f"unknown format {self.name!r}; known: {_known_names()}")
        is_int = self.name in ("int4", "int8")
        want_bits = 8 if self.name == "int8" else 4
        if self.bits != want_bits:
            raise ValueError(f"{self.name} has {want_bits} bits, got bits={self.bits}")
        if is_int:
            if not isinstance(self.block, int) or (self.block <= 0 and self.block != -1):
                raise ValueError(f"group size must be a positive int or -1, got {self.block!r}")
        else:
            want = 32 if self.name == "mxfp4" else 16
            if self.block != want:
                raise ValueError(f"{self.name} uses blocks of {want}, got block={self.block}")
            if not self.symmetric:
                raise ValueError(f"symmetric=False applies to int formats only, not {self.name}")
        if self.tile is not None:
            if self.name != "nvfp4-paper":
                raise ValueError(f"tile applies to nvfp4-paper only, not {self.name}")
            if tuple(self.tile) != (16, 16):
                raise ValueError(f"tile must be None or (16, 16), got {self.tile!r}")
            object.__setattr__(self, "tile", (16, 16))
        if self.scale_rule not in ("floor", "ceil"):
            raise ValueError(f"scale_rule must be 'floor' or 'ceil', got {self.scale_rule!r}")
        if self.scale_rule != "floor" and self.name != "mxfp4":
            raise ValueError(f"scale_rule applies to mxfp4 only, not {self.name}")
        if self.sign_magnitude:
            if not is_int:
                raise ValueError(f"sign_magnitude applies to int formats only, not {self.name}")
            if not self.symmetric:
                raise ValueError("sign_magnitude codes are symmetric: use symmetric=True")

    @property
    def is_int(self) -> bool:
        return self.name in ("int4", "int8")

    @property
    def packed(self) -> bool:
        """True when codes are 4-bit and stored two per byte."""
        return self.bits == 4

    @property
    def label(self) -> str:
        """Short display name, e.g. "int4-asym", "nvfp4-paper", "nvfp4-modelopt"."""
        if self.name == "nvfp4" and self.convention == "modelopt":
            return "nvfp4-modelopt"
        return self.name + ("-asym" if self.is_int and not self.symmetric else "")

    @property
    def nvfp4_ct(self) -> bool:
        """True for nvfp4 in the compressed-tensors convention (the default nvfp4)."""
        return self.name == "nvfp4" and self.convention == "ct"

    @property
    def scale_dtype(self):
        if self.name == "nvfp4":
            return jnp.float8_e4m3fn
        if self.name == "mxfp4":
            return jnp.float8_e8m0fnu
        return jnp.float32

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element (docs/spec/formats.md §8); whole-axis groups need
        ``bits_per_element(spec, k)``."""
        return bits_per_element(self)


def _known_names() -> str:
    return ", ".join(FORMAT_NAMES + tuple(_ALIASES))


_OVERRIDE_KEYS = (
    "block",
    "group_size",
    "symmetric",
    "tile",
    "scale_rule",
    "sign_magnitude",
    "convention",
)


def resolve_format(fmt: str | FormatSpec, **overrides) -> FormatSpec:
    """Resolve a name ("nvfp4", "nvfp4-modelopt", "int4-asym", ...) or a FormatSpec.

    Overrides: block / group_size (int only), symmetric (int only), tile (nvfp4-paper only),
    scale_rule (mxfp4 only), sign_magnitude (symmetric int only), convention (nvfp4 only: "ct" or
    "modelopt"). Anything invalid raises ValueError.
    """
    bad = sorted(set(overrides) - set(_OVERRIDE_KEYS))
    if bad:
        raise ValueError(f"unknown format options {bad}; known: {list(_OVERRIDE_KEYS)}")
    if "group_size" in overrides:
        if "block" in overrides and overrides["block"] != overrides["group_size"]:
            raise ValueError("give either block or group_size, not both")
        overrides["block"] = overrides.pop("group_size")
    if isinstance(fmt, FormatSpec):
        return dataclasses.replace(fmt, **overrides) if overrides else fmt
    if not isinstance(fmt, str):
        raise ValueError(f"format must be a name or a FormatSpec, got {type(fmt).__name__}")
    name, fixed = _ALIASES.get(fmt, (fmt, {}))
    if name not in FORMAT_NAMES:
        raise ValueError(f"unknown format {fmt!r}; known: {_known_names()}")
    if "block" in overrides and name not in ("int4", "int8"):
        default = 32 if name == "mxfp4" else 16
        if overrides["block"] != default:
            raise ValueError(
                f"{name} uses blocks of {default}; block/group_size is for int formats"
            )
    base = dict(
        name=name,
        bits=8 if name == "int8" else 4,
        block={"nvfp4": 16, "nvfp4-paper": 16, "mxfp4": 32}.get(name, 128),
    )
    base.update(fixed)
    base.update(overrides)
    return FormatSpec(**base)


def bits_per_element(fmt: str | FormatSpec, k: int | None = None) -> float:
    """Stored bits per element (docs/spec/formats.md §8): element bits plus scale (and zero)
    overhead.

    The nvfp4 per-tensor f32 scale is not included (it is 32 bits per tensor). ``k`` (the axis
    length) is needed only for int formats with a whole-axis group (block = -1).
    """
    spec = resolve_format(fmt)
    if spec.name == "nvfp4":
        return 4 + 8 / 16
    if spec.name == "mxfp4":
        return 4 + 8 / 32
    if spec.name == "nvfp4-paper":
        return 4 + 32 / (256 if spec.tile else 16)
    group = spec.block
    if group == -1:
        if k is None:
            raise ValueError("bits_per_element of a whole-axis group needs the axis length k")
        group = k
    return spec.bits + (32 + (0 if spec.symmetric else 8)) / group


# ----------------------------------------------------------------------------------------------
# Element codecs
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Block pieces
# ----------------------------------------------------------------------------------------------


def _nvfp4_spec(spec) -> FormatSpec:
    spec = resolve_format("nvfp4" if spec is None else spec)
    if spec.name != "nvfp4":
        raise ValueError(f"an nvfp4 tensor scale needs an nvfp4 format, got {spec.label}")
    return spec


def nvfp4_tensor_scale(x: jax.Array, spec: str | FormatSpec | None = None) -> jax.Array:
    """The nvfp4 tensor scale of ``x`` (f32 scalar) in ``spec``'s convention (default "nvfp4").

    With t = max|x| over the finite elements (NaN/Inf are ignored: their blocks become NaN on
    their own); pass a calibrated amax as ``x`` to get a static activation scale:
      * "ct" (default nvfp4): the encode global scale gs = fl(2688 · fl(1 / max(t, 2^-126))), 1
        when that is not finite (t = 0 or t < ~8e-36), exactly as compressed-tensors'
        ``generate_gparam`` (torch evaluates ``2688 / t`` as ``t.reciprocal() * 2688``);
      * "modelopt" ("nvfp4-modelopt"): the decode multiplier g = fl(t / 2688), 1 when t = 0.
    """
    spec = _nvfp4_spec(spec)
    a = jnp.abs(jnp.asarray(x).astype(jnp.float32))
    t = jnp.max(jnp.where(jnp.isfinite(a), a, 0.0), initial=0.0)
    if spec.convention == "ct":
        gs = div(1.0, jnp.maximum(t, jnp.float32(F32_TINY))) * jnp.float32(NVFP4_TENSOR_DIVISOR)
        return jnp.where(jnp.isfinite(gs), gs, jnp.float32(1.0))
    return jnp.where(t > 0, div(t, NVFP4_TENSOR_DIVISOR), jnp.float32(1.0))


def nvfp4_decode_scale(tensor_scale, spec: str | FormatSpec | None = None) -> jax.Array:
    """f32 multiplier that approximates the tensor part of the decode (1/gs for "ct", g for
    "modelopt"); used where the tensor scale is applied to an f32 accumulator (kernels)."""
    spec = _nvfp4_spec(spec)
    ts = jnp.asarray(tensor_scale, jnp.float32)
    return div(1.0, ts) if spec.convention == "ct" else ts


def _mx_multiplier(byte: jax.Array) -> jax.Array:
    # e = -127 (byte 0) is subnormal in f32, which XLA flushes: represent it by d = 0 and let
    # quantize/dequantize_blocks scale by normal powers of two instead. Byte 0xFF is NaN.
    e = byte.astype(jnp.int32) - 127
    d = jnp.where(e == -127, 0.0, pow2(jnp.clip(e, -126, 127)))
    return jnp.where(byte == 0xFF, jnp.nan, d)


def scale_multiplier(scale: jax.Array, spec: FormatSpec, tensor_scale=None) -> jax.Array:
    """f32 decode multiplier ``d[..., nblocks, 1]`` from stored scales ``[..., nblocks]``.

    nvfp4 "ct": fl32(s / gs); "modelopt": fl32(s * g); mxfp4: 2^e (0 stands for 2^-127, see
    module doc); others: the f32 scale.
    """
    if spec.name == "nvfp4":
        g = jnp.float32(1.0) if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32)
        if spec.convention == "ct":
            d = div(scale.astype(jnp.float32), g)
        else:
            d = scale.astype(jnp.float32) * g
    elif spec.name == "mxfp4":
        d = _mx_multiplier(jax.lax.bitcast_convert_type(scale, jnp.uint8))
    else:
        d = scale.astype(jnp.float32)
    return d[..., None]


def int_limits(spec: FormatSpec) -> tuple[int, int]:
    """(qmin, qmax): sym [-2^(b-1), 2^(b-1)-1] (sign-magnitude ±(2^(b-1)-1)), asym [0, 2^b-1]."""
    if spec.symmetric:
        hi = 2 ** (spec.bits - 1) - 1
        lo = -hi if spec.sign_magnitude else -hi - 1
        return lo, hi
    return 0, 2**spec.bits - 1


_int_limits = int_limits  # old private name, still used by callers


def check_int_rule(spec: FormatSpec, int_rule: str) -> str:
    """``int_rule`` (one of ``INT_RULES``) if it applies to ``spec``, else ValueError."""
    if int_rule not in INT_RULES:
        raise ValueError(f"int_rule must be one of {INT_RULES}, got {int_rule!r}")
    if int_rule != "default":
        if not spec.is_int:
            raise ValueError(f"int_rule applies to int formats only, not {spec.name}")
        if int_rule == "fprag" and spec.symmetric:
            raise ValueError("int_rule='fprag' is asymmetric: use an asymmetric int format")
    return int_rule


def block_params(xb: jax.Array, spec: FormatSpec, tensor_scale=None, int_rule: str = "default"):
    """Fit the per-block parameters of f32 blocks ``xb[..., nblocks, B]``.

    Returns ``(scale, d, zero)``:
      scale: stored scale ``[..., nblocks]`` in the storage dtype (float8_e4m3fn nvfp4,
        float8_e8m0fnu mxfp4, f32 otherwise);
      d: f32 decode multiplier ``[..., nblocks, 1]`` (see ``scale_multiplier``);
      zero: uint8 zero point ``[..., nblocks, 1]`` for asymmetric int, else None.
    ``tensor_scale`` (nvfp4 only) is gs ("ct") or g ("modelopt"), see ``nvfp4_tensor_scale``;
    None computes it from ``xb`` (padding zeros do not change it). ``int_rule`` (int formats): how
    the scale and zero point are fitted, one of ``INT_RULES``. Blocks holding a NaN/Inf get a NaN
    scale (and zero point 0).

    nvfp4 "ct" follows compressed-tensors' ``calculate_qparams``: raw = fl(gs · fl(a / 6)),
    s = E4M3(clip(raw, 0, 448)), and s = 0.125 where that rounds to 0 (its placeholder);
    "modelopt" (docs/spec/formats.md §3): raw = fl(fl(a / 6) / g), s = E4M3(clip(raw, 0, 448)).
    """
    xb = jnp.asarray(xb, jnp.float32)
    bad = jnp.any(~jnp.isfinite(xb), axis=-1)
    a = jnp.max(jnp.abs(xb), axis=-1)
    zero = None
    if spec.name == "nvfp4":
        g = nvfp4_tensor_scale(xb, spec) if tensor_scale is None else jnp.asarray(tensor_scale)
        g = g.astype(jnp.float32)
        if spec.convention == "ct":
            raw = g * div(a, 6.0)
        else:
            raw = div(div(a, 6.0), g)
        raw = jnp.clip(raw, 0.0, E4M3_MAX)  # clip: the cast overflows
        if spec.convention == "ct":
            raw = raw.astype(jnp.float8_e4m3fn).astype(jnp.float32)
            raw = jnp.where(raw == 0, jnp.float32(CT_ZERO_BLOCK_SCALE), raw)
        scale = jnp.where(bad, jnp.nan, raw).astype(jnp.float8_e4m3fn)
        return scale, scale_multiplier(scale, spec, g), None
    if spec.name == "nvfp4-paper":
        y = div(jnp.maximum(a, jnp.float32(_PAPER_FLOOR)), 6.0)
        e3 = exponent(y) - 3
        s = jnp.round(y * pow2(-e3)) * pow2(e3)  # 4 significant bits, exponent unbounded
        s = jnp.maximum(s, jnp.float32(_PAPER_FLOOR))
        scale = jnp.where(bad, jnp.nan, s)
        return scale, scale[..., None], None
    if spec.name == "mxfp4":
        if spec.scale_rule == "floor":
            e = jnp.frexp(a)[1] - 3
        else:
            # a/6 is subnormal (flushed to 0) below 6 * 2^-126: divide a * 2^64 instead.
            small = a < jnp.float32(2.0**-100)
            mant, ex = jnp.frexp(div(jnp.where(small, a * pow2(64), a), 6.0))
            e = ex - (mant == 0.5) - jnp.where(small, 64, 0)  # ceil(log2 y): powers of 2 stay
        e = jnp.where(a > 0, jnp.clip(e, -127, 127), -127)
        byte = jnp.where(bad, 0xFF, e + 127).astype(jnp.uint8)
        scale = jax.lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)
        return scale, _mx_multiplier(byte)[..., None], None
    # Integer formats.
    qmin, qmax = int_limits(spec)
    if spec.symmetric:
        if int_rule == "gptq":
            sc = div(jnp.maximum(a, jnp.float32(1e-5)), qmax)
        else:
            sc = div(a, qmax)
            sc = jnp.where(sc > 0, sc, jnp.float32(1.0))  # a = 0 (or underflow): scale 1
    else:
        lo_x = jnp.min(xb, axis=-1)
        hi_x = jnp.max(xb, axis=-1)
        if int_rule == "fprag":
            sc = jnp.maximum(div(hi_x - lo_x, qmax), jnp.float32(1e-8))
            lo = lo_x
        else:
            lo = jnp.minimum(lo_x, 0.0)
            hi = jnp.maximum(hi_x, 0.0)
            same = lo == hi
            lo = jnp.where(same, -1.0, lo)
            hi = jnp.where(same, 1.0, hi)
            if int_rule == "gptq":
                sc = div(jnp.maximum(hi - lo, jnp.float32(1e-5)), qmax)
            else:
                sc = div(hi - lo, qmax)
                sc = jnp.where(sc > 0, sc, jnp.float32(2.0 / qmax))  # underflow: as lo = hi
        z = jnp.clip(jnp.round(div(-lo, sc)), 0, qmax)
        zero = jnp.where(bad, 0, z).astype(jnp.uint8)[..., None]
    scale = jnp.where(bad, jnp.nan, sc)
    return scale, scale[..., None], zero


def quantize_blocks(
    xb: jax.Array, d: jax.Array, zero, spec: FormatSpec, int_rule: str = "default"
) -> jax.Array:
    """Integer codes of f32 ``xb[..., nblocks, B]`` given ``d``/``zero`` from ``block_params``.

    ``d`` and ``zero`` broadcast against ``xb`` (``[..., nblocks, 1]``). Codes are the unpacked
    storage codes: uint8 E2M1 codes (fp4), two's-complement nibbles (int4 sym), sign-magnitude
    (``sign_magnitude``), unsigned (asym), int8 (int8 sym). NaN blocks (d NaN) get code 0.
    ``int_rule`` as in ``block_params`` ("fprag" rounds after adding the zero point).

    nvfp4 "ct" takes the sign bit from x as compressed-tensors does (``torch.sign``): -0.0 gives
    0x0, a negative nonzero x that rounds to zero gives 0x8; the other fp4 formats use the
    sign bit of x / d (the ml_dtypes cast: -0.0 gives 0x8).
    """
    xb = jnp.asarray(xb, jnp.float32)
    d = jnp.asarray(d, jnp.float32)
    dead = jnp.isnan(d) | jnp.isnan(xb)
    v = div(xb, d)
    if spec.name in ("nvfp4", "nvfp4-paper", "mxfp4"):
        if spec.name == "mxfp4":
            v = jnp.where(d == 0, xb * pow2(127), v)  # d = 0 stands for 2^-127
        v = jnp.clip(v, -6.0, 6.0)
        if spec.name == "nvfp4-paper":
            codes = e2m1_encode_ties_down(v)
        else:
            codes = e2m1_encode(v)
        if spec.nvfp4_ct:
            bits = jax.lax.bitcast_convert_type(xb, jnp.int32)
            neg = (bits < 0) & ((bits & 0x7FFFFFFF) != 0)  # bits: immune to denormal flushing
            codes = (codes & 7) | jnp.where(neg, jnp.uint8(8), jnp.uint8(0))
        if spec.name == "nvfp4":
            dead = dead | (d == 0)  # flushed block (s = 0): all codes 0
        return jnp.where(dead, jnp.uint8(0), codes)
    qmin, qmax = int_limits(spec)
    if spec.symmetric:
        q = jnp.clip(jnp.round(v), qmin, qmax).astype(jnp.int32)
        q = jnp.where(dead, 0, q)
        if spec.sign_magnitude:
            sign_bit = 1 << (spec.bits - 1)
            return jnp.where(q < 0, sign_bit | -q, q).astype(jnp.uint8)
        if spec.bits == 8:
            return q.astype(jnp.int8)
        return (q & 0xF).astype(jnp.uint8)
    z = jnp.asarray(zero).astype(jnp.float32)
    if int_rule == "fprag":
        q = jnp.clip(jnp.round(v + z), qmin, qmax)  # RNE after adding z
    else:
        q = jnp.clip(jnp.round(v) + z, qmin, qmax)
    return jnp.where(dead, 0, q).astype(jnp.uint8)


def int_code_values(codes: jax.Array, spec: FormatSpec) -> jax.Array:
    """Signed integer value of int storage codes (int32); asymmetric codes are returned as is."""
    c = jnp.asarray(codes).astype(jnp.int32)
    if not spec.symmetric:
        return c
    if spec.sign_magnitude:
        sign_bit = 1 << (spec.bits - 1)
        return jnp.where(c & sign_bit, -(c & (sign_bit - 1)), c)
    if spec.bits == 8:
        return jnp.asarray(codes).astype(jnp.int8).astype(jnp.int32)
    return jnp.where(c >= 8, c - 16, c)


def dequantize_blocks(codes: jax.Array, d: jax.Array, zero, spec: FormatSpec) -> jax.Array:
    """f32 values of unpacked ``codes[..., nblocks, B]``; ``d``/``zero`` as in quantize_blocks."""
    d = jnp.asarray(d, jnp.float32)
    if spec.name in ("nvfp4", "nvfp4-paper", "mxfp4"):
        v = e2m1_decode(codes)
        if spec.name == "mxfp4":
            # 2^-127 as two normal factors (d = 0 stands for it). The barrier keeps XLA from
            # folding them into one (subnormal, hence flushed) constant 2^-127.
            tiny = jax.lax.optimization_barrier(v * pow2(-64))
            return jnp.where(d == 0, tiny * pow2(-63), v * d)
        return v * d
    q = int_code_values(codes, spec).astype(jnp.float32)
    if not spec.symmetric:
        q = q - jnp.asarray(zero).astype(jnp.float32)
    return q * d


# ----------------------------------------------------------------------------------------------
# Layout: axis to the end, padding, blocks / tiles
# ----------------------------------------------------------------------------------------------


def _block_len(spec: FormatSpec, k: int) -> int:
    return k if spec.block == -1 else spec.block


def _blockify(x: jax.Array, spec: FormatSpec, int_rule: str = "default") -> jax.Array:
    """f32 ``x[..., K]`` (axis last) -> blocks ``[..., nblocks, B]`` (tiles: ``[Nt, Kt, 256]``)."""
    k = x.shape[-1]
    b = _block_len(spec, k)
    kp = -(-k // b) * b
    if spec.tile is not None:
        tn, tk = spec.tile
        n = x.shape[0]
        npad = -(-n // tn) * tn
        x = jnp.pad(x, ((0, npad - n), (0, kp - k)))
        x = x.reshape(npad // tn, tn, kp // tk, tk).transpose(0, 2, 1, 3)
        return x.reshape(npad // tn, kp // tk, tn * tk)
    if kp != k:
        pad = [(0, 0)] * (x.ndim - 1) + [(0, kp - k)]
        # FPRAG's range is not widened to 0, so zero padding would change it: repeat an element
        # of the same block instead (the padded codes are zeroed afterwards).
        x = jnp.pad(x, pad, mode="edge" if int_rule == "fprag" else "constant")
    return x.reshape(*x.shape[:-1], kp // b, b)


def _unblockify(xb: jax.Array, spec: FormatSpec) -> jax.Array:
    """Inverse of ``_blockify`` up to padding: ``[..., nblocks, B]`` -> ``[..., K_pad]``."""
    if spec.tile is not None:
        tn, tk = spec.tile
        nt, kt = xb.shape[0], xb.shape[1]
        return xb.reshape(nt, kt, tn, tk).transpose(0, 2, 1, 3).reshape(nt * tn, kt * tk)
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])


def _check_layout(shape: tuple[int, ...], spec: FormatSpec, axis: int) -> int:
    if len(shape) == 0:
        raise ValueError("cannot quantize a scalar: need at least one axis")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for shape {shape}")
    axis = axis % len(shape)
    if shape[axis] == 0:
        raise ValueError(f"quantized axis {axis} of shape {shape} is empty")
    if spec.tile is not None and len(shape) != 2:
        raise ValueError(f"16x16 tiles need a 2-D weight [N, K], got shape {shape}")
    return axis


def _check_input(x, spec: FormatSpec, tensor_scale):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantization input must be floating point, got {x.dtype}")
    if tensor_scale is not None:
        if spec.name != "nvfp4":
            raise ValueError(f"tensor_scale applies to nvfp4 only, not {spec.name}")
        ts = jnp.asarray(tensor_scale)
        if ts.size != 1:
            raise ValueError(f"tensor_scale must be a scalar, got shape {ts.shape}")
        if not _is_traced(ts) and not (np.isfinite(float(ts)) and float(ts) > 0):
            raise ValueError(f"tensor_scale must be positive and finite, got {float(ts)}")
    return x


def _is_traced(x) -> bool:
    tracer = getattr(jax.core, "Tracer", None)
    if tracer is not None:
        return isinstance(x, tracer)
    try:  # pragma: no cover - fallback for jax versions without jax.core.Tracer
        np.asarray(x)
        return False
    except jax.errors.ConcretizationTypeError:
        return True


def _quant_core(x, spec: FormatSpec, axis: int, tensor_scale, int_rule: str):
    """Shared by fake_quant and quantize: (codes [..., K_pad], scale, d, zero, g, moved shape)."""
    x32 = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    if spec.name == "nvfp4":
        g = nvfp4_tensor_scale(x32, spec) if tensor_scale is None else tensor_scale
        g = jnp.asarray(g, jnp.float32).reshape(())
    else:
        g = jnp.float32(1.0)
    xb = _blockify(x32, spec, int_rule)
    scale, d, zero = block_params(xb, spec, g if spec.name == "nvfp4" else None, int_rule)
    codes = quantize_blocks(xb, d, zero, spec, int_rule)
    k = x32.shape[-1]
    if not spec.symmetric and xb.shape[-2] * xb.shape[-1] != k:
        # Padded codes are 0 (fp and symmetric formats give 0 for a zero pad by themselves).
        pos = jnp.arange(xb.shape[-2] * xb.shape[-1]).reshape(xb.shape[-2:])
        codes = jnp.where(pos < k, codes, jnp.zeros((), codes.dtype))
    return codes, scale, d, zero, g, x32.shape


def _finish(y_blocks, spec: FormatSpec, moved_shape, axis: int, dtype):
    y = _unblockify(y_blocks, spec)
    if spec.tile is not None:
        y = y[: moved_shape[0]]
    y = y[..., : moved_shape[-1]]
    return jnp.moveaxis(y, -1, axis).astype(dtype)


@functools.partial(jax.jit, static_argnames=("spec", "axis", "int_rule"))
def _fake_quant_jit(x, spec: FormatSpec, axis: int, tensor_scale, int_rule: str):
    codes, _, d, zero, _, moved = _quant_core(x, spec, axis, tensor_scale, int_rule)
    y = dequantize_blocks(codes, d, zero, spec)
    return _finish(y, spec, moved, axis, x.dtype)


def fake_quant(
    x, fmt, axis: int = -1, *, tensor_scale=None, int_rule: str = "default", **overrides
) -> jax.Array:
    """Quantize-dequantize ``x`` (any float dtype/shape) along ``axis``; same shape and dtype.

    Computed in f32 from the f32 upcast; NaN/Inf make their block NaN. ``tensor_scale`` (nvfp4
    only) fixes the tensor scale (gs for "nvfp4", g for "nvfp4-modelopt", see
    ``nvfp4_tensor_scale``) instead of the dynamic one from max|x|. ``int_rule`` (int formats,
    one of ``INT_RULES``): the scale rule of the method that quantizes. Jit-able with ``fmt``
    and ``int_rule`` static; equals ``dequantize(quantize(x, ...))`` bit for bit.
    """
    spec = resolve_format(fmt, **overrides)
    int_rule = check_int_rule(spec, int_rule)
    x = _check_input(x, spec, tensor_scale)
    axis = _check_layout(x.shape, spec, axis)
    return _fake_quant_jit(x, spec, axis, tensor_scale, int_rule)


# ----------------------------------------------------------------------------------------------
# Packed storage
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class QTensor:
    """A quantized array (pytree). The quantized axis is moved to the end of codes/scales.

    Attributes:
      codes: 4-bit formats: uint8 ``[..., ceil(K_pad/2)]``, element 2i in the low nibble;
        int8: int8 (sym) / uint8 (asym) ``[..., K_pad]``. 16x16 tiles: ``[N_pad, K_pad/2]``.
      scales: storage dtype (float8_e4m3fn nvfp4, float8_e8m0fnu mxfp4, f32 otherwise),
        ``[..., K_pad/B]``, or ``[N_pad/16, K_pad/16]`` for tiles.
      tensor_scale: f32 scalar: nvfp4 "ct" the encode global scale gs = 2688/amax (stored by
        compressed-tensors as ``weight_global_scale``), nvfp4 "modelopt" the decode multiplier
        g = amax/2688 (ModelOpt's ``weight_scale_2``); 1.0 for other formats.
      zeros: uint8 ``[..., K_pad/B]`` (asymmetric int) or None.
      shape: true shape of the original array (static); spec, axis (non-negative), dtype (the
        original dtype name) are static too.
      int_rule: static, the ``INT_RULES`` entry that fitted the scales (a record of the method's
        choice, kept in checkpoints; ``dequantize`` does not read it).
    """

    codes: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array
    zeros: jax.Array | None
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    spec: FormatSpec = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)
    int_rule: str = struct.field(pytree_node=False, default="default")

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes, scales, zero points and (nvfp4) the f32 tensor scale."""
        n = self.codes.nbytes + self.scales.nbytes
        if self.zeros is not None:
            n += self.zeros.nbytes
        if self.spec.name == "nvfp4":
            n += 4
        return int(n)


@functools.partial(jax.jit, static_argnames=("spec", "axis", "int_rule"))
def _quantize_jit(x, spec: FormatSpec, axis: int, tensor_scale, int_rule: str):
    codes, scale, _, zero, g, _ = _quant_core(x, spec, axis, tensor_scale, int_rule)
    codes = _unblockify(codes, spec)
    if spec.packed:
        if codes.shape[-1] % 2:
            codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
        codes = pack_nibbles(codes)
    return codes, scale, g, None if zero is None else zero[..., 0]


def quantize(
    x, fmt, axis: int = -1, *, tensor_scale=None, int_rule: str = "default", **overrides
) -> QTensor:
    """Quantize ``x`` along ``axis`` into a packed ``QTensor`` (see ``fake_quant`` for arguments).

    Called eagerly, rejects NaN/Inf input with ValueError (the check is skipped under jit).
    """
    spec = resolve_format(fmt, **overrides)
    int_rule = check_int_rule(spec, int_rule)
    x = _check_input(x, spec, tensor_scale)
    axis = _check_layout(x.shape, spec, axis)
    if not _is_traced(x) and not bool(jnp.all(jnp.isfinite(x))):
        n_nan = int(jnp.sum(jnp.isnan(x)))
        n_inf = int(jnp.sum(jnp.isinf(x)))
        raise ValueError(f"cannot quantize non-finite input: {n_nan} NaN and {n_inf} Inf values")
    codes, scales, g, zeros = _quantize_jit(x, spec, axis, tensor_scale, int_rule)
    return QTensor(
        codes=codes,
        scales=scales,
        tensor_scale=g,
        zeros=zeros,
        shape=tuple(int(s) for s in x.shape),
        spec=spec,
        axis=axis,
        dtype=jnp.dtype(x.dtype).name,
        int_rule=int_rule,
    )


def _dequantize_impl(q: QTensor, dtype):
    spec = q.spec
    moved = list(q.shape)
    moved.append(moved.pop(q.axis))
    k = moved[-1]
    b = _block_len(spec, k)
    kp = -(-k // b) * b
    codes = unpack_nibbles(q.codes)[..., :kp] if spec.packed else q.codes
    if spec.tile is not None:
        cb = _blockify(codes, spec)  # already padded: only regroups into tiles
    else:
        cb = codes.reshape(*codes.shape[:-1], kp // b, b)
    d = scale_multiplier(q.scales, spec, q.tensor_scale)
    zero = None if q.zeros is None else q.zeros[..., None]
    y = dequantize_blocks(cb, d, zero, spec)
    return _finish(y, spec, tuple(moved), q.axis, dtype)


_dequantize_jit = jax.jit(_dequantize_impl, static_argnames=("dtype",))


def dequantize(q: QTensor, dtype=None) -> jax.Array:
    """Decode a ``QTensor`` to its true shape in ``dtype`` (default: the original dtype).

    Bit-identical to ``fake_quant`` of the original array with the same options.
    """
    if not isinstance(q, QTensor):
        raise ValueError(f"dequantize expects a QTensor, got {type(q).__name__}")
    dt = jnp.dtype(q.dtype if dtype is None else dtype)
    return _dequantize_jit(q, dt)


def padded_length(k: int, fmt) -> int:
    """K_pad = ceil(K / B) * B for axis length ``k`` under ``fmt``."""
    spec = resolve_format(fmt)
    b = _block_len(spec, k)
    return -(-k // b) * b


__all__ = [
    "E2M1_VALUES",
    "FORMAT_NAMES",
    "INT_RULES",
    "PAPER_CODEBOOK",
    "PAPER_INDEX_TO_CODE",
    "FormatSpec",
    "QTensor",
    "bits_per_element",
    "block_params",
    "check_int_rule",
    "dequantize",
    "dequantize_blocks",
    "div",
    "e2m1_decode",
    "e2m1_encode",
    "e2m1_encode_ties_down",
    "e2m1_ties_down_index",
    "fake_quant",
    "int_code_values",
    "int_limits",
    "NVFP4_CONVENTIONS",
    "nvfp4_decode_scale",
    "nvfp4_tensor_scale",
    "pack_nibbles",
    "padded_length",
    "quantize",
    "quantize_blocks",
    "resolve_format",
    "scale_multiplier",
    "unpack_nibbles",
]


def smooth_reciprocal(smooth: jax.Array) -> jax.Array:
    """fl32(1/s) ``[K]``: an elementwise division, which XLA leaves exact on every backend."""
    return 1.0 / smooth.astype(jnp.float32)


def smooth_input(x: jax.Array, smooth: jax.Array | None) -> jax.Array:
    """x_s = f32(x) · fl32(1/s) (``[..., K]`` f32); the f32 upcast alone when ``smooth`` is None.

    A multiplication by the rounded reciprocal rather than x/s: XLA rewrites ``x / broadcast(s)``
    into exactly this on CPU (fast-math algebraic simplifier) but not necessarily elsewhere, and
    Triton's f32 division is not IEEE-rounded, so only this form is the same bits in the jnp path
    and in the kernels on every backend. It differs from x/s by at most 1 ulp.
    """
    xs = x.astype(jnp.float32)
    if smooth is None:
        return xs
    return xs * smooth_reciprocal(smooth)


def dense_weight(w) -> jax.Array:
    """The weight of a linear's field as an array ``[out, in]``: a packed ``QTensor`` →
    ``dequantize(w, f32)``; a tuple of them (mixed-precision column blocks, e.g. ResQ's low and
    high parts) → their f32 dequantizations concatenated along ``in``; an array as it is."""
    if isinstance(w, tuple):
        return jnp.concatenate([dequantize(q, jnp.float32) for q in w], axis=1)
    if isinstance(w, QTensor):
        return dequantize(w, jnp.float32)
    return w
