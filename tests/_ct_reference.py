"""compressed-tensors as the independent reference: its own NVFP4 decompression of our arrays."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import torch
from compressed_tensors.compressors.nvfp4 import base as ct_nvfp4_base
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import preset_name_to_scheme

SCHEME = preset_name_to_scheme("NVFP4", ["Linear"])


def to_torch(a: np.ndarray):
    if a.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())


def ct_decompress(arrays: dict, dtype) -> np.ndarray:
    """compressed-tensors' NVFP4PackedCompressor.decompress (its code path, unpack dtype set):
    the decoded weight's bits (uint32 for f32, uint16 for bf16)."""
    state = {k: to_torch(v) for k, v in arrays.items()}
    unpack = ct_nvfp4_base.unpack_fp4_from_uint8
    orig = ct_nvfp4_base.unpack_fp4_from_uint8
    ct_nvfp4_base.unpack_fp4_from_uint8 = functools.partial(unpack, dtype=dtype)
    try:
        out = NVFP4PackedCompressor.decompress(state, SCHEME)["weight"]
    finally:
        ct_nvfp4_base.unpack_fp4_from_uint8 = orig
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(np.uint16)
    return out.numpy().view(np.uint32)
