"""An independent numpy / ml_dtypes implementation of nvfp4 and mxfp4 (docs/spec/formats.md §3, §5,
§7).

"nvfp4" is the compressed-tensors convention (written from compressed-tensors' own arithmetic:
gs = fl(2688·fl(1/amax)), s = E4M3(gs·fl(a/6)) or 0.125, d = fl(s/gs), sign from torch.sign(x));
"nvfp4-modelopt" is docs/spec/formats.md §3 (g = amax/2688, s = E4M3((a/6)/g), d = fl(s·g)).

Used by test_kernels.py and test_qlinear.py as the float64 reference: it shares no code with
``arhq_jax.numerics.formats`` or the kernels. All quantization arithmetic is numpy float32, as the
spec says.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
BLOCK = {"nvfp4": 16, "nvfp4-modelopt": 16, "mxfp4": 32}


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """RNE codes through the ml_dtypes cast (v already clipped to [-6, 6])."""
    f4 = np.asarray(v, np.float32).astype(ml_dtypes.float4_e2m1fn)
    return np.frombuffer(f4.tobytes(), np.uint8).reshape(f4.shape) & 0xF


def _blocks(x: np.ndarray, b: int) -> np.ndarray:
    k = x.shape[-1]
    kp = -(-k // b) * b
    xp = np.zeros(x.shape[:-1] + (kp,), np.float32)
    xp[..., :k] = x
    return xp.reshape(x.shape[:-1] + (kp // b, b))


def quantize(x: np.ndarray, fmt: str, tensor_scale=None):
    """Quantize f32 ``x[..., K]`` along the last axis. Returns (codes [..., K_pad], d [..., nb, 1]).

    d is the f32 decode multiplier per block (nvfp4: fl32(s/gs); nvfp4-modelopt: fl32(s·g);
    mxfp4: 2^e as float64 so that 2^-127 stays exact).
    """
    x = np.asarray(x, np.float32)
    xb = _blocks(x, BLOCK[fmt])
    amax = np.abs(xb).max(-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fmt == "nvfp4":
            if tensor_scale is None:
                t = np.maximum(np.float32(np.abs(x).max()), np.finfo(np.float32).tiny)
                gs = (np.float32(1) / t) * np.float32(2688)
                gs = gs if np.isfinite(gs) else np.float32(1)
            else:
                gs = np.float32(tensor_scale)
            raw = gs * (amax / np.float32(6))
            s = np.clip(raw, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            s = np.where(s == 0, np.float32(0.125), s)
            d = (s / gs).astype(np.float32)[..., None]
            mag = e2m1_codes(np.abs(np.clip(xb / d, -6, 6))) & 7
            codes = mag | np.where(np.sign(xb) < 0, 8, 0).astype(np.uint8)
        elif fmt == "nvfp4-modelopt":
            if tensor_scale is None:
                t = np.float32(np.abs(x).max())
                g = t / np.float32(2688) if t > 0 else np.float32(1)
            else:
                g = np.float32(tensor_scale)
            raw = (amax / np.float32(6)) / g
            s = np.clip(raw, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            d = (s * g).astype(np.float32)[..., None]
            codes = np.where(d > 0, e2m1_codes(np.clip(xb / d, -6, 6)), 0)
        else:
            _, ex = np.frexp(amax)
            e = np.where(amax > 0, np.clip(ex - 3, -127, 127), -127)
            d = np.ldexp(1.0, e)[..., None]  # float64: 2^-127 is exact
            codes = e2m1_codes(np.clip(xb / d, -6, 6).astype(np.float32))
    return codes.reshape(x.shape[:-1] + (-1,)), d


def fake_quant(x: np.ndarray, fmt: str, tensor_scale=None) -> np.ndarray:
    """Quantize-dequantize ``x[..., K]`` in float64 (values are exact)."""
    codes, d = quantize(x, fmt, tensor_scale)
    b = BLOCK[fmt]
    k = x.shape[-1]
    v = E2M1[codes].astype(np.float64).reshape(d.shape[:-1] + (b,)) * d.astype(np.float64)
    if fmt != "mxfp4":
        v = v.astype(np.float32).astype(np.float64)  # value · d rounded to f32, as stored
    return v.reshape(x.shape[:-1] + (-1,))[..., :k]


def decode_weight(codes: np.ndarray, scales: np.ndarray, g: float, fmt: str, k: int) -> np.ndarray:
    """Decode packed ``codes [N, K_pad/2]`` (element 2i in the low nibble) to float64 ``[N, k]``.

    ``scales`` is the raw storage array (float8_e4m3fn or float8_e8m0fnu, as numpy/ml_dtypes);
    ``g`` the tensor scale in ``fmt``'s convention (gs for "nvfp4", g for "nvfp4-modelopt").
    """
    codes = np.asarray(codes, np.uint8)
    nib = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
    v = E2M1[nib].astype(np.float64)
    b = BLOCK[fmt]
    if fmt != "mxfp4":
        s = np.asarray(scales).astype(np.float32)
        d = s / np.float32(g) if fmt == "nvfp4" else s * np.float32(g)
        d = d.astype(np.float32)
        w = (v.reshape(v.shape[0], -1, b) * d[..., None]).astype(np.float32)
    else:
        e = np.asarray(scales).view(np.uint8).astype(np.int64) - 127
        w = v.reshape(v.shape[0], -1, b) * np.ldexp(1.0, e)[..., None]
    return w.reshape(w.shape[0], -1)[:, :k].astype(np.float64)


def lowrank_matmul(x, w64, a, b, smooth, act_fmt, bias=None, tensor_scale=None) -> np.ndarray:
    """float64 y = Q_a(x_s)·w64ᵀ + (x_s·a)·bᵀ (+ bias), with x_s = f32(x)·fl32(1/s)."""
    xs = np.asarray(x, np.float32)
    if smooth is not None:
        xs = (xs * (np.float32(1) / np.asarray(smooth, np.float32))).astype(np.float32)
    xq = xs.astype(np.float64) if act_fmt is None else fake_quant(xs, act_fmt, tensor_scale)
    y = xq @ w64.T
    if a is not None:
        a64 = np.asarray(a, np.float32).astype(np.float64)
        b64 = np.asarray(b, np.float32).astype(np.float64)
        y = y + (xs.astype(np.float64) @ a64) @ b64.T
    if bias is not None:
        y = y + np.asarray(bias, np.float32).astype(np.float64)
    return y
