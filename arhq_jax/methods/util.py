"""Helpers shared by the pipeline adapters of the methods (timing, statistics, scales)."""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp

from arhq_jax.calibration import global_scales as GS
from arhq_jax.calibration.stats import StatsConfig
from arhq_jax.models.config import GROUP_OF


@contextlib.contextmanager
def timed(timings: dict, key: str):
    """Add the wall time of the block to ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] += time.perf_counter() - t0


def device_rel_err(w_hat, w) -> jax.Array:
    """‖ŵ − w‖ / ‖w‖ as an f32 device scalar (no host sync)."""
    w = jnp.asarray(w, jnp.float32)
    return jnp.linalg.norm(w_hat - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30)


def rel_err(w_hat, w) -> float:
    """‖ŵ − w‖ / ‖w‖ (f32)."""
    return float(device_rel_err(w_hat, w))


def group_stats(calib, layer, groups, qcfg, **keep) -> dict:
    """Finalized statistics of every input group in ``groups`` (``keep_*`` flags; no absmax
    unless asked)."""
    spec = StatsConfig(dtype=qcfg.stats_dtype, **{"keep_absmax": False, **keep})
    out = calib.stats(layer, {g: spec for g in groups})
    return jax.block_until_ready(out)


def f32(a):
    return None if a is None else jnp.asarray(a, jnp.float32)


def static_act_scales(qcfg, st: dict, projs) -> dict:
    """{proj: static nvfp4 activation scale} from the groups' absmax, or {} (dynamic/other)."""
    if not qcfg.static_act_scale:
        return {}
    scale = {g: GS.act_scale(GS.amax(v["absmax"])) for g, v in st.items()}
    return {p: scale[GROUP_OF[p]] for p in projs}


def fused_w_scales(qcfg, weights: dict) -> dict:
    """{proj: nvfp4 weight global scale shared by its fused partitions}, or {} when off."""
    return GS.fused_weight_scales(
        weights, GROUP_OF, qcfg.fused_w_scale and qcfg.w_spec.name == "nvfp4"
    )
