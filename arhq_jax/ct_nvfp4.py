"""TEMPORARY STUB (integrator): replaced by the formats engineer's module at merge."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from arhq_jax import formats

CT_WEIGHT_TENSORS = ("weight_packed", "weight_scale", "weight_global_scale")


def to_ct(qt):
    if qt.spec.name != "nvfp4" or len(qt.shape) != 2 or qt.axis != 1 or qt.shape[1] % 16:
        raise ValueError("not expressible")
    return {
        "weight_packed": np.asarray(qt.codes),
        "weight_scale": np.asarray(qt.scales),
        "weight_global_scale": np.asarray(qt.tensor_scale, np.float32).reshape(1),
    }


def from_ct(t, shape, dtype):
    return formats.QTensor(
        codes=jnp.asarray(t["weight_packed"]),
        scales=jnp.asarray(t["weight_scale"]),
        tensor_scale=jnp.asarray(t["weight_global_scale"]).reshape(()),
        zeros=None,
        shape=tuple(shape),
        spec=formats.resolve_format("nvfp4"),
        axis=1,
        dtype=dtype,
    )


def input_global_scale(s):
    return np.asarray(s, np.float32).reshape(1)


def act_scale_from_ct(x):
    return np.asarray(x, np.float32).reshape(())


def quantization_config(ignore, w4a4):
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "ignore": ignore,
    }
