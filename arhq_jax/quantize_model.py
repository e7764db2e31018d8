"""Quantize a whole model: calibrate → decompose → pack, layer by layer.

For every decoder layer and every selected input group:

1. *Calibrate*: stream the group's input through ``arhq_jax.stats`` (G = EᵀE/N for ARHQ; in the
   smooth setting first absmax, then the 21-point α search per projection, then G on x/s). With
   static nvfp4 activation scales (the default) the input amax comes first and fixes the
   activation global scale (one per input group, per projection when smoothed), and G is taken
   with that static quantizer.
2. *Decompose*: per projection, W (or W·s) → residual + B Aᵀ (``arhq``/``svdquant``; RTN keeps W).
3. *Pack*: the residual → ``QTensor`` in the weight format (nvfp4: one weight global scale for
   the fused q/k/v and gate/up partitions by default), wrapped with A, B, s and the static
   activation scale in a ``QuantLinear`` that replaces the float projection.

By default every layer is calibrated on the unquantized model (the reference's *parallel* mode);
``sequential=True`` calibrates layer l on a model whose earlier layers (and, within the layer, the
earlier groups {q,k,v} → {o} → {gate,up} → {down}) are already quantized.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from arhq_jax import decompose, global_scales, stats
from arhq_jax.calibrate import LayerwiseRunner
from arhq_jax.formats import dequantize
from arhq_jax.models import transformer
from arhq_jax.models.config import GROUP_OF, INPUT_GROUPS, Layer, ModelConfig, Params
from arhq_jax.qlinear import QuantLinear, smooth_input
from arhq_jax.quant_config import LOWRANK_METHODS, QuantConfig

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class QuantizeResult:
    """The quantized model, per-projection diagnostics and the time split."""

    params: Params
    projections: list[dict]  # one dict per (layer, projection)
    timings: dict[str, float]  # calibration_s, decomposition_s, packing_s
    calib_tokens: int


def _block(x):
    return jax.block_until_ready(x)


def _stats_cfg(qcfg: QuantConfig, *, g: bool, absmax: bool, h: bool = False) -> stats.StatsConfig:
    return stats.StatsConfig(
        act_fmt=qcfg.act_spec if g else None,
        keep_g=g,
        keep_h=h,
        keep_absmax=absmax,
        dtype=qcfg.stats_dtype,
    )


def _accumulate(
    runner: LayerwiseRunner,
    layer: Layer,
    specs: dict,
    scales: dict | None = None,
    tensor_scales: dict | None = None,
):
    """Stream ``specs`` = {state name: StatsConfig} over the calibration batches → finalized stats.

    A name is ``group`` or ``group:proj``; when ``scales`` has an entry for the name, the input is
    smoothed first, as the runtime does it (``smooth_input``: x·fl32(1/s), G of the smoothed
    space); ``tensor_scales[name]`` fixes the nvfp4 activation scale of E = x − Q(x) (the static
    runtime quantizer; default dynamic over each batch)."""
    scales = scales or {}
    tensor_scales = tensor_scales or {}
    shapes = runner.cfg.linear_shapes()
    init = {
        name: stats.init_stats(shapes[INPUT_GROUPS[name.split(":")[0]][0]][1], scfg)
        for name, scfg in specs.items()
    }

    def update(name, state, x, mask):
        s = scales.get(name)
        if s is not None:
            x = smooth_input(x, s)
        return stats.update_stats(
            state, x, specs[name], mask=mask, tensor_scale=tensor_scales.get(name)
        )

    return {k: stats.finalize(v) for k, v in runner.accumulate(layer, init, update).items()}


def _alpha_search(runner, layer, projs, m_x, qcfg):
    """Per projection: the α* of the smoothing grid and its scale s ``[in]`` (methods.md §2.3).

    With static nvfp4 activation scales each candidate α quantizes x/s_α with the static scale
    of its amax over the calibration set (from ``m_x``), as the runtime will."""
    init = {f"{GROUP_OF[p]}:{p}": decompose.init_alpha_search() for p in projs}

    def update(name, state, x, mask):
        p = name.split(":")[1]
        w = getattr(layer, p).w
        return decompose.update_alpha_search(
            state,
            x,
            w,
            m_x[GROUP_OF[p]],
            qcfg.w_spec,
            qcfg.act_spec,
            mask=mask,
            static_act_scale=qcfg.static_act_scale,
        )

    searched = runner.accumulate(layer, init, update)
    out = {}
    for name, state in searched.items():
        p = name.split(":")[1]
        alpha = decompose.select_alpha(state)
        w = getattr(layer, p).w
        s = decompose.smooth_scales(m_x[GROUP_OF[p]], decompose.weight_absmax(w), alpha)
        out[p] = (alpha, s.astype(jnp.float32))
    return out


def _split(qcfg: QuantConfig, w_t: jax.Array, g: jax.Array | None, factor_dtype, factors=None):
    if not qcfg.uses_branch:
        return None
    if qcfg.method == "svdquant":
        return decompose.svdquant(w_t, qcfg.rank, dtype=factor_dtype)
    if factors is not None:  # [speed] one factorization per shared G (q/k/v, gate/up)
        g = factors(g, w_t.shape)
    return decompose.arhq(w_t, g, qcfg.rank, qcfg.eps, qcfg.rel_eps, dtype=factor_dtype)


def _pack_residual(qcfg: QuantConfig, residual, h, s, bias, split, act_scale=None, w_scale=None):
    """The residual → ``QuantLinear``: RTN (``formats.quantize``) or GPTQ under ``h`` (the
    Hessian of the input the residual sees, x/s); ``act_scale`` the static nvfp4 activation
    scale (None: dynamic), ``w_scale`` the nvfp4 weight global scale (None: the residual's own)."""
    a = None if split is None else split.a
    b = None if split is None else split.b
    kw = {"smooth": s, "bias": bias, "act_scale": act_scale}
    if h is None:
        return QuantLinear.from_float(
            residual, a, b, qcfg.w_spec, qcfg.act_spec, w_tensor_scale=w_scale, **kw
        )
    from arhq_jax.methods.gptq import gptq_quantize

    w_spec = qcfg.w_spec
    res = gptq_quantize(
        residual,
        h,
        w_spec,
        percdamp=qcfg.percdamp,
        block_size=qcfg.block_size,
        act_order=qcfg.act_order,
        static_groups=qcfg.act_order and w_spec.block != -1,
        mse_clip=qcfg.mse_clip,
        tensor_scale=w_scale,
    )
    # from_float validates shapes and formats; its RTN packing is replaced by GPTQ's.
    ql = QuantLinear.from_float(residual, a, b, w_spec, qcfg.act_spec, **kw)
    return ql.replace(w=res.qtensor)


def _quantize_group(layer, projs, g_of, smooth, qcfg, factor_dtype, timings, layer_idx, h_of, act):
    """Decompose and pack ``projs`` of ``layer``; returns ({proj: QuantLinear}, diagnostics).

    ``act``: {proj: static activation scale}. Every projection is split first, so that the fused
    partitions (q/k/v, gate/up) can share one nvfp4 weight global scale of their residuals."""
    new, diags, splits = {}, [], {}
    factors = decompose.GFactorCache(qcfg.eps, qcfg.rel_eps)  # [speed]
    for p in projs:
        w = getattr(layer, p).w.astype(jnp.float32)
        alpha, s = smooth.get(p, (None, None))
        w_t = w if s is None else w * s[None, :]
        t0 = time.perf_counter()
        split = _block(_split(qcfg, w_t, g_of.get(p), factor_dtype, factors))
        timings["decomposition_s"] += time.perf_counter() - t0
        splits[p] = (split, w_t if split is None else split.residual)
    fused = qcfg.fused_w_scale and qcfg.w_spec.name == "nvfp4"
    w_scales = global_scales.fused_weight_scales(
        {p: r for p, (_, r) in splits.items()}, GROUP_OF, fused
    )
    for p in projs:
        lin = getattr(layer, p)
        alpha, s = smooth.get(p, (None, None))
        split, residual = splits[p]
        t1 = time.perf_counter()
        ql = _pack_residual(
            qcfg, residual, h_of.get(p), s, lin.b, split, act.get(p), w_scales.get(p)
        )
        deq = _block(dequantize(ql.w, jnp.float32))
        timings["packing_s"] += time.perf_counter() - t1
        d = {
            "layer": layer_idx,
            "proj": p,
            "alpha": alpha,
            "w_quant_rel_err": jnp.linalg.norm(deq - residual)
            / jnp.maximum(jnp.linalg.norm(residual), 1e-30),
        }
        if split is not None:
            d.update(
                objective=split.objective,
                n_clamped=split.n_clamped,
                max_abs_a=split.max_abs_a,
                branch_rel_norm=split.branch_rel_norm,
            )
        diags.append(d)
        new[p] = ql
    # [speed] one device→host transfer for the group's diagnostics, not one per number
    return new, [_host_diag(d) for d in jax.device_get(diags)]


def _host_diag(d: dict) -> dict:
    """Python numbers for the device scalars of one projection's diagnostics."""
    out = dict(d)
    for k in ("w_quant_rel_err", "objective", "max_abs_a", "branch_rel_norm"):
        if k in out:
            out[k] = float(out[k])
    if "n_clamped" in out:
        out["n_clamped"] = int(out["n_clamped"])
    return out


class Calibration:
    """What a method may ask of the calibration data while it quantizes one layer.

    Wraps a ``LayerwiseRunner`` (None when the method needs no data and the mode is parallel:
    then no forward pass runs at all).
    """

    def __init__(self, runner: LayerwiseRunner | None, cfg: ModelConfig):
        self.runner = runner
        self.cfg = cfg

    def _need(self) -> LayerwiseRunner:
        if self.runner is None:
            raise ValueError("this method declared that it needs no calibration data")
        return self.runner

    def stats(
        self,
        layer: Layer,
        specs: dict,
        scales: dict | None = None,
        tensor_scales: dict | None = None,
    ) -> dict:
        """Finalized streaming statistics, see ``_accumulate``."""
        return _accumulate(self._need(), layer, specs, scales, tensor_scales)

    def alpha_search(self, layer: Layer, projs, m_x: dict, qcfg: QuantConfig) -> dict:
        """Per projection ``(α*, s)`` of the smoothing grid (methods.md §2.3)."""
        return _alpha_search(self._need(), layer, projs, m_x, qcfg)

    def inputs(self, layer: Layer, group: str, max_tokens: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of at most ``max_tokens`` real input tokens of ``group``:
        f32 ``[n, D]`` (for methods whose objective needs the tokens themselves, e.g. AWQ)."""
        runner = self._need()
        xs = []
        for captured, mask in runner.captures(layer):
            x = np.asarray(captured[group], np.float32)
            xs.append(x[np.asarray(mask)])
        return _subsample(np.concatenate(xs), max_tokens, seed)

    def _head_batches(self, final_norm):
        """The lm_head input, ``rms_norm(h, final_norm)`` of the hidden states after the layers
        the runner has been advanced through (all of them once the layer loop is done)."""
        runner = self._need()
        for h, valid in runner._batches:
            x = transformer.rms_norm(h, final_norm, self.cfg.rms_norm_eps)
            yield x, jnp.broadcast_to(valid[:, None], h.shape[:2])

    def head_stats(self, final_norm, spec: stats.StatsConfig) -> dict:
        """Finalized statistics of the lm_head input (see ``_head_batches``)."""
        st = stats.init_stats(self.cfg.hidden_size, spec)
        for x, mask in self._head_batches(final_norm):
            st = stats.update_stats(st, x, spec, mask=mask)
        return stats.finalize(st)

    def head_inputs(self, final_norm, max_tokens: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of at most ``max_tokens`` lm_head input tokens (f32
        ``[n, H]``)."""
        xs = [np.asarray(x, np.float32)[np.asarray(m)] for x, m in self._head_batches(final_norm)]
        return _subsample(np.concatenate(xs), max_tokens, seed)


def _subsample(x: np.ndarray, max_tokens: int, seed: int) -> np.ndarray:
    if len(x) > max_tokens:
        idx = np.random.default_rng(seed).choice(len(x), max_tokens, replace=False)
        x = x[np.sort(idx)]
    return x


class LowRankMethod:
    """RTN, SVDQuant and ARHQ, raw or smoothed (methods.md §1–§3)."""

    def needs_calibration(self, qcfg: QuantConfig) -> bool:
        return (
            qcfg.setting == "smooth"
            or (qcfg.method == "arhq" and qcfg.uses_branch)
            or qcfg.residual_quant == "gptq"
            or qcfg.static_act_scale
        )

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        """Quantize ``projs`` (of input ``groups``) of ``layer`` → (new layer, diagnostics).

        With ``residual_quant="gptq"`` the residual is GPTQ-quantized under H of the input it
        sees (x, or x/s per projection in the smooth setting), accumulated in the same pass as G.
        With static nvfp4 activation scales, the amax of every quantized input (x per group, or
        x/s per projection) is measured first, so that G = E{EᵀE} is taken with the very
        quantizer the runtime applies (E = x − Q(x; static scale)).
        """
        need_g = qcfg.method == "arhq" and qcfg.uses_branch
        need_h = qcfg.residual_quant == "gptq"
        static = qcfg.static_act_scale
        t0 = time.perf_counter()
        smooth, g_of, h_of, act = {}, {}, {}, {}
        if qcfg.setting == "smooth":
            spec = _stats_cfg(qcfg, g=False, absmax=True)
            absmax = calib.stats(layer, {g: spec for g in groups})
            smooth = calib.alpha_search(
                layer, projs, {g: absmax[g]["absmax"] for g in groups}, qcfg
            )
            names = {p: f"{GROUP_OF[p]}:{p}" for p in projs}
            if static:  # exact amax of x·fl32(1/s) from the absmax of x (global_scales)
                act = {
                    p: global_scales.act_scale(
                        global_scales.smoothed_amax(absmax[GROUP_OF[p]]["absmax"], smooth[p][1])
                    )
                    for p in projs
                }
            if need_g or need_h:
                spec = _stats_cfg(qcfg, g=need_g, absmax=False, h=need_h)
                gs = calib.stats(
                    layer,
                    {n: spec for n in names.values()},
                    {names[p]: smooth[p][1] for p in projs},
                    {names[p]: act[p] for p in act},
                )
                g_of = {p: gs[names[p]]["G"] for p in projs} if need_g else {}
                h_of = {p: gs[names[p]]["H"] for p in projs} if need_h else {}
        else:
            gs = {}
            if static:  # pass 1: the amax (with H when only H is needed: it ignores the scale)
                spec = _stats_cfg(qcfg, g=False, absmax=True, h=need_h and not need_g)
                gs = calib.stats(layer, {g: spec for g in groups})
                scale = {
                    g: global_scales.act_scale(global_scales.amax(gs[g]["absmax"])) for g in groups
                }
                act = {p: scale[GROUP_OF[p]] for p in projs}
                if need_g:
                    spec = _stats_cfg(qcfg, g=True, absmax=False, h=need_h)
                    gs = calib.stats(layer, {g: spec for g in groups}, None, scale)
            elif need_g or need_h:
                spec = _stats_cfg(qcfg, g=need_g, absmax=False, h=need_h)
                gs = calib.stats(layer, {g: spec for g in groups})
            g_of = {p: gs[GROUP_OF[p]]["G"] for p in projs} if need_g else {}
            h_of = {p: gs[GROUP_OF[p]]["H"] for p in projs} if need_h else {}
        _block((g_of, h_of, act))
        timings["calibration_s"] += time.perf_counter() - t0
        factor_dtype = qcfg.factor_dtype or calib.cfg.param_dtype
        new, diags = _quantize_group(
            layer, projs, g_of, smooth, qcfg, factor_dtype, timings, layer_idx, h_of, act
        )
        return layer.replace(**new), diags


def get_method(name: str):
    """The layer quantizer of a method name (the low-rank family or a registered baseline)."""
    if name in LOWRANK_METHODS:
        return LowRankMethod()
    from arhq_jax.methods import LAYER_METHODS

    if name in LAYER_METHODS:
        return LAYER_METHODS[name]
    raise ValueError(f"unknown method {name!r}")


def quantize_model(
    params: Params,
    cfg: ModelConfig,
    calib_ids,
    qcfg: QuantConfig,
    *,
    batch_size: int = 8,
    mesh=None,
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

    Returns:
      A ``QuantizeResult``; its ``params`` has quantized projections where selected.
    """
    qcfg.check_model(cfg)
    method = get_method(qcfg.method)
    timings = {"calibration_s": 0.0, "decomposition_s": 0.0, "packing_s": 0.0}
    if hasattr(method, "prepare"):  # whole-model transforms (rotations, untying) before layers
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
        runner = LayerwiseRunner(params, cfg, calib_ids, batch_size=batch_size, mesh=mesh)
        timings["calibration_s"] += time.perf_counter() - t0
    calib = Calibration(runner, cfg)
    # Sequential mode recalibrates after each group; parallel mode reads all groups in one pass.
    stages = [(g,) for g in qcfg.groups] if qcfg.sequential else [qcfg.groups]
    layers, diags = [], []
    bar = tqdm(
        total=cfg.num_layers * len(stages),
        desc=f"quantize {qcfg.label()}",
        disable=not progress,
        unit="stage",
    )
    for li, fp_layer in enumerate(params.layers):
        layer = fp_layer
        for groups in stages:
            projs = [p for g in groups for p in INPUT_GROUPS[g] if p in qcfg.projections]
            # f64 statistics (and the decompositions that read them) need x64 switched on.
            with jax.enable_x64(qcfg.stats_dtype == "float64"):
                layer, d = method.quantize_stage(layer, groups, projs, calib, qcfg, li, timings)
            diags += d
            bar.update(1)
        layers.append(layer)
        if runner is not None:
            t0 = time.perf_counter()
            runner.advance(layer if qcfg.sequential else fp_layer)
            timings["calibration_s"] += time.perf_counter() - t0
    bar.close()
    qparams = params.replace(layers=tuple(layers))
    if hasattr(method, "finish"):  # e.g. a quantized lm_head
        qparams = method.finish(qparams, cfg, calib, qcfg)
    calib_tokens = 0 if runner is None else runner.num_tokens
    return QuantizeResult(qparams, diags, timings, calib_tokens)


def summarize(diags: list[dict]) -> dict:
    """Means of the per-projection diagnostics (for logs and the CLI)."""
    out = {}
    for key in ("w_quant_rel_err", "branch_rel_norm", "max_abs_a", "n_clamped"):
        vals = [d[key] for d in diags if d.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
    return out
