"""The low-rank family: RTN, SVDQuant and ARHQ, raw or smoothed (docs/spec/methods.md §1–§3).

Per layer stage and input group:

1. *Calibrate*: stream the group's input through ``arhq_jax.stats`` (G = EᵀE/N for ARHQ; in the
   smooth setting first absmax, then the 21-point α search per projection, then G on x/s). With
   static nvfp4 activation scales (the default) the input amax comes first and fixes the
   activation global scale (one per input group, per projection when smoothed), and G is taken
   with that static quantizer.
2. *Decompose*: per projection, W (or W·s) → residual + B Aᵀ (``arhq``/``svdquant``; RTN keeps W).
3. *Pack*: the residual → ``QTensor`` in the weight format (RTN, or GPTQ with
   ``residual_quant="gptq"``, through the same ``gptq_linear`` as ``--method gptq``; nvfp4: one
   weight global scale for the fused q/k/v and gate/up partitions by default), wrapped with A, B,
   s and the static activation scale in a ``QuantLinear`` that replaces the float projection.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from arhq_jax import decompose, global_scales, stats
from arhq_jax.argtypes import NONNEG, float_in
from arhq_jax.formats import dequantize
from arhq_jax.methods.base import (
    ALL_ACTS,
    GPTQ_OPTIONS,
    LINEAR_FORMATS,
    RESIDUAL_QUANTS,
    SETTINGS,
    GPTQOptions,
    Method,
    MethodFormats,
    Options,
    check_rank,
    check_residual_quant,
    option,
)
from arhq_jax.methods.gptq_method import gptq_weight
from arhq_jax.models.config import GROUP_OF
from arhq_jax.qlinear import QuantLinear


@dataclasses.dataclass(frozen=True)
class RTNOptions(Options):
    """RTN's option: the smoothing setting."""

    setting: str = option(
        "raw",
        "raw, or smooth: per-projection α-searched smoothing (docs/spec/methods.md §2.3)",
        choices=SETTINGS,
    )

    def check(self, common) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; supported: {', '.join(SETTINGS)}")


@dataclasses.dataclass(frozen=True)
class SVDQuantOptions(GPTQOptions, RTNOptions):
    """SVDQuant's options: the setting, rank, factor dtype and the residual's quantizer (GPTQ's
    options apply with ``residual_quant="gptq"``)."""

    rank: int = option(32, "rank r of the float low-rank branch", type=NONNEG)
    factor_dtype: str | None = option(
        None,
        "storage dtype of A and B (default: the model's parameter dtype); the residual is "
        "recomputed from the cast factors",
        choices=("float32", "bfloat16", "float16"),
    )
    residual_quant: str = option(
        "rtn",
        "quantizer of the residual / main weight: rtn or gptq",
        choices=RESIDUAL_QUANTS,
    )

    def check(self, common) -> None:
        RTNOptions.check(self, common)
        check_rank(self.rank)
        check_residual_quant(self.residual_quant)
        if self.residual_quant == "gptq":
            GPTQOptions.check(self, common)

    def unused(self, common) -> tuple[str, ...]:
        return () if self.residual_quant == "gptq" else GPTQ_OPTIONS


@dataclasses.dataclass(frozen=True)
class ARHQOptions(SVDQuantOptions):
    """ARHQ's options: SVDQuant's plus the eigenvalue clamp of G."""

    eps: float = option(1e-6, "ARHQ's absolute eigenvalue clamp of G", type=float_in(0))
    rel_eps: float | None = option(
        None, "ARHQ's eigenvalue clamp relative to λ_max", type=float_in(0)
    )


def stats_config(qcfg, *, g: bool, absmax: bool, h: bool = False) -> stats.StatsConfig:
    """The ``StatsConfig`` of a recipe: G (under its activation format), H and/or absmax."""
    return stats.StatsConfig(
        act_fmt=qcfg.act_spec if g else None,
        keep_g=g,
        keep_h=h,
        keep_absmax=absmax,
        dtype=qcfg.stats_dtype,
    )


def split_weight(qcfg, w_t: jax.Array, g: jax.Array | None, factor_dtype, factors=None):
    """The low-rank split of ``w_t`` (svdquant, or arhq under ``g``), or None without a branch.

    ``factors``: a ``decompose.GFactorCache`` shared by the projections of one G."""
    if not qcfg.uses_branch:
        return None
    if qcfg.method == "svdquant":
        return decompose.svdquant(w_t, qcfg.rank, dtype=factor_dtype)
    if factors is not None:  # one factorization per shared G (q/k/v, gate/up)
        g = factors(g, w_t.shape)
    return decompose.arhq(w_t, g, qcfg.rank, qcfg.eps, qcfg.rel_eps, dtype=factor_dtype)


def _pack_residual(qcfg, residual, h, s, bias, split, act_scale=None, w_scale=None):
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
    res = gptq_weight(residual, h, qcfg.w_spec, qcfg, w_scale=w_scale)
    # from_float validates shapes and formats; its RTN packing is replaced by GPTQ's.
    ql = QuantLinear.from_float(residual, a, b, qcfg.w_spec, qcfg.act_spec, **kw)
    return ql.replace(w=res.qtensor)


def _quantize_group(layer, projs, g_of, smooth, qcfg, factor_dtype, timings, layer_idx, h_of, act):
    """Decompose and pack ``projs`` of ``layer``; returns ({proj: QuantLinear}, diagnostics).

    ``act``: {proj: static activation scale}. Every projection is split first, so that the fused
    partitions (q/k/v, gate/up) can share one nvfp4 weight global scale of their residuals."""
    new, diags, splits = {}, [], {}
    factors = decompose.GFactorCache(qcfg.eps, qcfg.rel_eps)
    for p in projs:
        w = getattr(layer, p).w.astype(jnp.float32)
        alpha, s = smooth.get(p, (None, None))
        w_t = w if s is None else w * s[None, :]
        t0 = time.perf_counter()
        split = jax.block_until_ready(split_weight(qcfg, w_t, g_of.get(p), factor_dtype, factors))
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
        deq = jax.block_until_ready(dequantize(ql.w, jnp.float32))
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
    # One device→host transfer for the group's diagnostics, not one per number.
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


class LowRankMethod(Method):
    """RTN, SVDQuant and ARHQ, raw or smoothed (docs/spec/methods.md §1–§3)."""

    formats = MethodFormats(LINEAR_FORMATS, ALL_ACTS, "nvfp4", "nvfp4")
    fused_w_scale = True

    def needs_calibration(self, qcfg) -> bool:
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
            spec = stats_config(qcfg, g=False, absmax=True)
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
                spec = stats_config(qcfg, g=need_g, absmax=False, h=need_h)
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
                spec = stats_config(qcfg, g=False, absmax=True, h=need_h and not need_g)
                gs = calib.stats(layer, {g: spec for g in groups})
                scale = {
                    g: global_scales.act_scale(global_scales.amax(gs[g]["absmax"])) for g in groups
                }
                act = {p: scale[GROUP_OF[p]] for p in projs}
                if need_g:
                    spec = stats_config(qcfg, g=True, absmax=False, h=need_h)
                    gs = calib.stats(layer, {g: spec for g in groups}, None, scale)
            elif need_g or need_h:
                spec = stats_config(qcfg, g=need_g, absmax=False, h=need_h)
                gs = calib.stats(layer, {g: spec for g in groups})
            g_of = {p: gs[GROUP_OF[p]]["G"] for p in projs} if need_g else {}
            h_of = {p: gs[GROUP_OF[p]]["H"] for p in projs} if need_h else {}
        jax.block_until_ready((g_of, h_of, act))
        timings["calibration_s"] += time.perf_counter() - t0
        factor_dtype = qcfg.factor_dtype or calib.cfg.param_dtype
        new, diags = _quantize_group(
            layer, projs, g_of, smooth, qcfg, factor_dtype, timings, layer_idx, h_of, act
        )
        return layer.replace(**new), diags

    def check_model(self, qcfg, cfg) -> None:
        if not qcfg.uses_branch:
            return
        for name, (out_f, in_f) in cfg.linear_shapes().items():
            if name in qcfg.projections and qcfg.rank > min(out_f, in_f):
                raise ValueError(
                    f"rank {qcfg.rank} is too large for {name} of shape [{out_f}, {in_f}] "
                    f"(at most {min(out_f, in_f)})"
                )


class RTN(LowRankMethod):
    """Round-to-nearest of W (or W·s in the smooth setting), no branch."""

    name = "rtn"
    Options = RTNOptions


class SVDQuant(LowRankMethod):
    """The plain truncated SVD branch (as the ARHQ reference implements SVDQuant)."""

    name = "svdquant"
    Options = SVDQuantOptions
    branch = True


class ARHQ(LowRankMethod):
    """ARHQ: the branch that minimizes the activation-quantization error under G."""

    name = "arhq"
    Options = ARHQOptions
    branch = True
    formats = MethodFormats(LINEAR_FORMATS, LINEAR_FORMATS, "nvfp4", "nvfp4")

    def check(self, qcfg) -> None:
        if qcfg.act_fmt is None:
            raise ValueError(
                "arhq needs an activation format: G is built from the activation quantization "
                "residual, which is zero for weight-only quantization (use svdquant there)"
            )
