"""Quantize a whole model: the layer loop.

The method (``qcfg.method``, a registered ``arhq_jax.methods.base.Method``) may transform the whole
model first (``prepare``), then quantizes every decoder layer stage by stage
(``quantize_stage``: calibrate → decompose → pack the stage's projections, reading calibration
data through ``arhq_jax.calibration.calibrate.Calibration``), and may finish on the quantized model
(``finish``, e.g. a quantized lm_head). The low-rank family's steps are in
``arhq_jax.methods.lowrank``.

By default every layer is calibrated on the unquantized model (the reference's *parallel* mode);
``sequential=True`` calibrates layer l on a model whose earlier layers (and, within the layer, the
earlier groups {q,k,v} → {o} → {gate,up} → {down}) are already quantized.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from arhq_jax.calibration.calibrate import Calibration, LayerwiseRunner, data_mesh
from arhq_jax.models.config import INPUT_GROUPS, ModelConfig, Params
from arhq_jax.parallel.devices import Spread
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.progress import LayerProgress


@dataclasses.dataclass
class QuantizeResult:
    """The quantized model, per-projection diagnostics and the time split."""

    params: Params
    projections: list[dict]  # one dict per (layer, projection)
    timings: dict[str, float]  # calibration_s, decomposition_s, packing_s
    calib_tokens: int


def quantize_model(
    params: Params,
    cfg: ModelConfig,
    calib_ids,
    qcfg: QuantConfig,
    *,
    batch_size: int = 8,
    mesh=None,
    devices=None,
    hidden_on_host: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize every selected projection of ``params`` with ``qcfg``.

    Args:
      params, cfg: the float model.
      calib_ids: ``[S, L]`` int calibration token ids (equal-length sequences); None only for a
        data-free recipe (parallel mode, no statistics, dynamic or no activation scales).
      qcfg: the recipe (method, setting, rank, formats, modules, sequential).
      batch_size: calibration sequences per forward.
      mesh: device mesh for the batch (default: all visible devices).
      devices: devices the per-projection decompositions are spread over (default: the mesh's
        devices of this process; ``arhq_jax.parallel.devices``).
      hidden_on_host: keep the calibration hidden states in host memory between layers (one
        batch on the device at a time; the same bits).

    Returns:
      A ``QuantizeResult``; its ``params`` has quantized projections where selected.
    """
    qcfg.check_model(cfg)
    method = qcfg.method_impl
    timings = {"calibration_s": 0.0, "decomposition_s": 0.0, "packing_s": 0.0}
    # Whole-model transforms (rotations, untying) before the layers; identity by default.
    t0 = time.perf_counter()
    params = method.prepare(params, cfg, calib_ids, qcfg)
    timings["calibration_s"] += time.perf_counter() - t0
    # Data-free methods in parallel mode never run the model (no calibration forward at all).
    runner = None
    if qcfg.sequential or method.needs_calibration(qcfg):
        if calib_ids is None:
            why = (
                " (static nvfp4 activation scales are calibrated)" if qcfg.static_act_scale else ""
            )
            raise ValueError(f"{qcfg.label()} needs calibration tokens{why}; calib_ids is None")
        t0 = time.perf_counter()
        runner = LayerwiseRunner(
            params, cfg, calib_ids, batch_size=batch_size, mesh=mesh, hidden_on_host=hidden_on_host
        )
        timings["calibration_s"] += time.perf_counter() - t0
    # Whole-model decisions (e.g. the ranks of a rank budget); None by default.
    t0 = time.perf_counter()
    plan = method.plan(params, cfg, calib_ids, qcfg, batch_size=batch_size, mesh=mesh)
    timings["calibration_s"] += time.perf_counter() - t0
    spread = Spread.for_mesh(runner.mesh if runner else mesh or data_mesh(), devices)
    calib = Calibration(runner, cfg, plan, spread)
    stages = layer_stages(qcfg)
    layers, diags = [], []
    bar = LayerProgress(cfg.num_layers, len(stages), desc=qcfg.label(), disable=not progress)
    for li, fp_layer in enumerate(params.layers):
        layer, d = quantize_layer(fp_layer, li, stages, calib, qcfg, timings, bar)
        diags += d
        layers.append(layer)
        if runner is not None:
            t0 = time.perf_counter()
            runner.advance(layer if qcfg.sequential else fp_layer)
            timings["calibration_s"] += time.perf_counter() - t0
    bar.close()
    qparams = params.replace(layers=tuple(layers))
    qparams = method.finish(qparams, cfg, calib, qcfg)  # e.g. a quantized lm_head
    calib_tokens = 0 if runner is None else runner.num_tokens
    return QuantizeResult(qparams, diags, timings, calib_tokens)


def layer_stages(qcfg: QuantConfig) -> list[tuple[str, ...]]:
    """The input groups quantized together, in order: sequential mode recalibrates after each
    group, parallel mode reads all groups in one pass."""
    return [(g,) for g in qcfg.groups] if qcfg.sequential else [qcfg.groups]


def quantize_layer(layer, li: int, stages, calib: Calibration, qcfg: QuantConfig, timings, bar):
    """Decoder layer ``li`` quantized stage by stage (``layer_stages``) → (layer, diagnostics);
    ``bar`` advances once per stage. The one per-layer step of the in-memory and the streamed
    loop (``arhq_jax.run.stream``)."""
    method = qcfg.method_impl
    diags = []
    t0 = time.perf_counter()
    with jax.enable_x64(qcfg.stats_dtype == "float64"):  # e.g. folded smoothing
        layer, extra = method.transform_layer(layer, calib, qcfg)
    timings["calibration_s"] += time.perf_counter() - t0
    for groups in stages:
        projs = [p for g in groups for p in INPUT_GROUPS[g] if p in qcfg.projections]
        parts = qcfg.split_projections(li, projs)  # [(qcfg, projs)] without ignore/overrides
        if len(parts) == 1 and parts[0][0] is qcfg and parts[0][1] == projs:
            # f64 statistics (and the decompositions that read them) need x64 switched on.
            with jax.enable_x64(qcfg.stats_dtype == "float64"):
                layer, d = method.quantize_stage(layer, groups, projs, calib, qcfg, li, timings)
        else:  # per-module recipes: every part calibrated on the stage's input layer
            new, d = {}, []
            for q, ps in parts:
                gs = tuple(g for g in groups if set(INPUT_GROUPS[g]) & set(ps))
                with jax.enable_x64(qcfg.stats_dtype == "float64"):
                    out, dp = method.quantize_stage(layer, gs, ps, calib, q, li, timings)
                new.update({p: getattr(out, p) for p in ps})
                d += dp
            layer = layer.replace(**new) if new else layer
        diags += [{**x, **extra.get(x.get("proj"), {})} for x in d]
        bar.update(1)
    return layer, diags


def summarize(diags: list[dict]) -> dict:
    """Means of the per-projection diagnostics (for logs and the CLI)."""
    out = {}
    for key in ("w_quant_rel_err", "branch_rel_norm", "max_abs_a", "n_clamped"):
        vals = [d[key] for d in diags if d.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
    return out
