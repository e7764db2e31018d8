"""The compressed-tensors ``nvfp4-pack-quantized`` layout of an nvfp4 weight (pure, numpy in/out).

compressed-tensors (0.20) stores a linear ``<name>`` quantized with its NVFP4 / NVFP4A16 presets as

  ============================  ===================  ===============  =========================
  tensor                        dtype                shape            meaning
  ============================  ===================  ===============  =========================
  ``<name>.weight_packed``      uint8                ``[N, K/2]``     E2M1 codes, element 2i in
                                                                      the low nibble
  ``<name>.weight_scale``       float8_e4m3fn        ``[N, K/16]``    block scales s (row-major)
  ``<name>.weight_global_scale``  float32            ``[1]``          gs = 2688/amax(W)
  ``<name>.input_global_scale``   float32            ``[1]``          static activation gs (W4A4)
  ============================  ===================  ===============  =========================

and decodes w = value(code) · fl32(s / gs). That is exactly arhq-jax's default ``"nvfp4"``
(compressed-tensors convention, ``formats.FormatSpec.convention == "ct"``): a ``QTensor`` maps to
these arrays without any arithmetic, and compressed-tensors' own decompression of them is
bit-identical to ``formats.dequantize`` (tests/checkpoint/test_nvfp4_pack.py). ``"nvfp4-modelopt"``
tensors use
another tensor-scale convention and are refused, as are K not a multiple of 16 (compressed-tensors
requires it; our formats pad), other formats, tiles and non-2-D arrays.

Nothing here imports compressed-tensors (a test-only dependency) or touches files: the checkpoint
writer/reader calls these functions with arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from arhq_jax.numerics import formats

CT_FORMAT = "nvfp4-pack-quantized"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config this reproduces
WEIGHT_KEYS = ("weight_packed", "weight_scale", "weight_global_scale")
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _check_ct_spec(spec: formats.FormatSpec, what: str) -> None:
    if spec.name != "nvfp4":
        raise ValueError(
            f"{what}: the compressed-tensors {CT_FORMAT} layout holds nvfp4 only, not {spec.label}"
        )
    if spec.convention != "ct":
        raise ValueError(
            f"{what}: {spec.label} uses ModelOpt's tensor-scale convention; the compressed-tensors "
            "layout needs the default 'nvfp4' (compressed-tensors convention): re-quantize with it"
        )


def _check_k(k: int, what: str) -> None:
    if k % 16:
        raise ValueError(
            f"{what}: in_features K = {k} is not a multiple of 16, which the compressed-tensors "
            f"{CT_FORMAT} layout requires (arhq-jax pads; compressed-tensors does not)"
        )


def to_ct(qt: formats.QTensor) -> dict[str, np.ndarray]:
    """The compressed-tensors arrays of a 2-D weight ``QTensor`` [N, K] in "nvfp4", axis 1.

    Returns ``{"weight_packed": uint8 [N, K/2], "weight_scale": float8_e4m3fn [N, K/16],
    "weight_global_scale": float32 [1]}`` (new numpy arrays; the values are the QTensor's own, no
    arithmetic). Raises ValueError naming the reason for any other tensor (format, convention,
    rank, axis, K % 16 != 0, tiles, inconsistent arrays, a non-finite or non-positive scale).
    """
    if not isinstance(qt, formats.QTensor):
        raise ValueError(f"to_ct expects a formats.QTensor, got {type(qt).__name__}")
    _check_ct_spec(qt.spec, "to_ct")
    if len(qt.shape) != 2 or qt.axis != 1:
        raise ValueError(
            f"to_ct: needs a 2-D weight [out, in] quantized along in (axis 1), got shape "
            f"{qt.shape} axis {qt.axis}"
        )
    n, k = qt.shape
    _check_k(k, "to_ct")
    packed = np.array(qt.codes)
    scale = np.array(qt.scales)
    gs = np.array(qt.tensor_scale, dtype=np.float32).reshape(-1)
    if packed.dtype != np.uint8 or packed.shape != (n, k // 2):
        raise ValueError(
            f"to_ct: codes must be uint8 {(n, k // 2)}, got {packed.dtype} {packed.shape}"
        )
    if scale.dtype != _E4M3 or scale.shape != (n, k // 16):
        raise ValueError(
            f"to_ct: scales must be float8_e4m3fn {(n, k // 16)}, got {scale.dtype} {scale.shape}"
        )
    _check_scale_bytes(scale, "to_ct: scales")
    if gs.size != 1 or not (np.isfinite(gs[0]) and gs[0] > 0):
        raise ValueError(f"to_ct: tensor_scale must be one positive finite f32, got {gs.tolist()}")
    return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": gs}


def _check_scale_bytes(scale: np.ndarray, what: str) -> None:
    b = scale.view(np.uint8)
    nan = int(np.count_nonzero((b & 0x7F) == 0x7F))
    neg = int(np.count_nonzero(((b & 0x80) != 0) & ((b & 0x7F) != 0x7F)))
    if nan or neg:
        raise ValueError(
            f"{what} hold {nan} NaN and {neg} negative E4M3 values; block scales are "
            "non-negative and finite"
        )


def _as_array(tensors: dict, key: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"from_ct: missing tensor {key!r} (need {', '.join(WEIGHT_KEYS)})")
    try:
        return np.asarray(tensors[key])
    except Exception as e:  # e.g. a torch tensor of an unsupported dtype
        raise ValueError(
            f"from_ct: {key} is not an array ({type(tensors[key]).__name__}: {e})"
        ) from None


def from_ct(tensors: dict, shape: tuple[int, int], dtype: str) -> formats.QTensor:
    """The "nvfp4" ``QTensor`` [N, K] (axis 1) of compressed-tensors weight arrays.

    Args:
      tensors: ``{"weight_packed", "weight_scale", "weight_global_scale"}`` as numpy arrays (the
        module-local names; an ``input_global_scale`` entry is allowed and ignored here).
      shape: the weight's true shape ``(N, K)``, K a multiple of 16.
      dtype: the original float dtype name ("bfloat16", "float32" or "float16").
    Raises:
      ValueError naming the tensor and what was expected, for a missing or unknown tensor, a wrong
      dtype or shape, a NaN or negative block scale, or a non-positive/non-finite global scale.
    """
    if not isinstance(tensors, dict):
        raise ValueError(f"from_ct expects a dict of arrays, got {type(tensors).__name__}")
    unknown = sorted(set(tensors) - set(WEIGHT_KEYS) - {"input_global_scale"})
    if unknown:
        raise ValueError(f"from_ct: unknown tensors {unknown}; expected {list(WEIGHT_KEYS)}")
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in shape)
        or min(shape) <= 0
    ):
        raise ValueError(f"from_ct: shape must be two positive ints (N, K), got {shape!r}")
    n, k = int(shape[0]), int(shape[1])
    _check_k(k, "from_ct")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"from_ct: dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
    packed = _as_array(tensors, "weight_packed")
    scale = _as_array(tensors, "weight_scale")
    gs = _as_array(tensors, "weight_global_scale")
    for key, arr, want_dtype, want_shape in (
        ("weight_packed", packed, np.dtype(np.uint8), (n, k // 2)),
        ("weight_scale", scale, _E4M3, (n, k // 16)),
        ("weight_global_scale", gs, np.dtype(np.float32), (1,)),
    ):
        if arr.dtype != want_dtype:
            raise ValueError(f"from_ct: {key} must be {want_dtype}, got {arr.dtype}")
        if arr.shape != want_shape:
            raise ValueError(
                f"from_ct: {key} must have shape {want_shape} for a weight {(n, k)}, "
                f"got {arr.shape}"
            )
    _check_scale_bytes(scale, "from_ct: weight_scale")
    if not (np.isfinite(gs[0]) and gs[0] > 0):
        raise ValueError(f"from_ct: weight_global_scale must be positive and finite, got {gs[0]}")
    return formats.QTensor(
        codes=jnp.asarray(packed),
        scales=jnp.asarray(scale),
        tensor_scale=jnp.asarray(gs[0], jnp.float32),
        zeros=None,
        shape=(n, k),
        spec=formats.resolve_format("nvfp4"),
        axis=1,
        dtype=dtype,
    )


def input_global_scale(act_scale, act_fmt="nvfp4") -> np.ndarray:
    """``<name>.input_global_scale`` (float32 ``[1]``) of a static nvfp4 activation scale.

    ``act_scale`` is ``QuantLinear.act_scale`` for an "nvfp4" activation format: already the
    compressed-tensors encode global scale gs = 2688/amax (``formats.nvfp4_tensor_scale`` of the
    calibrated amax), so the value is stored unchanged. "nvfp4-modelopt" scales are refused.
    """
    _check_ct_spec(formats.resolve_format(act_fmt), "input_global_scale")
    a = np.asarray(act_scale, dtype=np.float32).reshape(-1)
    if a.size != 1 or not (np.isfinite(a[0]) and a[0] > 0):
        raise ValueError(
            f"input_global_scale: act_scale must be one positive finite value, got {a}"
        )
    return a.copy()


def act_scale_from_input_global_scale(arr) -> np.float32:
    """Inverse of ``input_global_scale``: the "nvfp4" static activation scale (f32 scalar)."""
    a = np.asarray(arr)
    if a.dtype != np.float32 or a.shape != (1,):
        raise ValueError(f"input_global_scale must be float32 (1,), got {a.dtype} {a.shape}")
    if not (np.isfinite(a[0]) and a[0] > 0):
        raise ValueError(f"input_global_scale must be positive and finite, got {a[0]}")
    return np.float32(a[0])


def _fp4_args(dynamic, observer: str | None = None) -> dict:
    # QuantizationArgs.model_dump() of compressed-tensors 0.20 (fields at their default omitted).
    d = {
        "dynamic": dynamic,
        "group_size": 16,
        "num_bits": 4,
        "scale_dtype": "torch.float8_e4m3fn",
        "strategy": "tensor_group",
        "symmetric": True,
        "type": "float",
    }
    if observer is not None:
        d["observer"] = observer
    return dict(sorted(d.items()))


def quantization_config(ignore: list[str], w4a4: bool) -> dict:
    """``config.json``'s ``quantization_config`` as compressed-tensors 0.20 writes it for the
    NVFP4 (``w4a4=True``: weights and activations, dynamic per-16 activation block scales with a
    static ``input_global_scale``) or NVFP4A16 (weight-only) preset, format
    ``nvfp4-pack-quantized``, targets ``["Linear"]`` and the given ``ignore`` list (module names,
    e.g. ``["lm_head"]``). Keys sorted as ``ModelCompressor.update_config`` dumps them.
    """
    if not isinstance(ignore, list | tuple) or not all(isinstance(s, str) for s in ignore):
        raise ValueError(f"ignore must be a list of module names (str), got {ignore!r}")
    group = {
        "format": CT_FORMAT,
        "input_activations": _fp4_args("local", "static_minmax") if w4a4 else None,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": _fp4_args(False),
    }
    return {
        "config_groups": {"group_0": group},
        "format": CT_FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


__all__ = [
    "CT_FORMAT",
    "CT_VERSION",
    "WEIGHT_KEYS",
    "act_scale_from_input_global_scale",
    "from_ct",
    "input_global_scale",
    "quantization_config",
    "to_ct",
]
