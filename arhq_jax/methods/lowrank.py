"""The low-rank family: RTN, SVDQuant and ARHQ, raw or smoothed (docs/spec/methods.md §1–§3).

Per layer stage and input group:

1. *Calibrate*: stream the group's input through ``arhq_jax.calibration.stats`` (G = EᵀE/N for
ARHQ; in the
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
import numpy as np

import arhq_jax.methods.fold_smoothing as fold_smoothing
from arhq_jax.calibration import global_scales, stats
from arhq_jax.calibration.calibrate import Calibration, LayerwiseRunner
from arhq_jax.decomposition import decompose, rank_budget, refine, rotate
from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.methods.argtypes import NONNEG, POS, float_in
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
from arhq_jax.models.params import has_bias
from arhq_jax.numerics.formats import dequantize
from arhq_jax.parallel import devices


@dataclasses.dataclass(frozen=True)
class RTNOptions(Options):
    """RTN's option: the smoothing setting."""

    setting: str = option(
        "raw",
        "raw; smooth: per-projection α-searched smoothing (docs/spec/methods.md §2.3); fold: "
        "one α-searched vector per input group folded into the norms and v/up rows "
        "(methods/fold_smoothing.py; exportable)",
        choices=SETTINGS,
    )
    # beyond ARHQ: arhq_jax/decomposition/rotate.py; the α search on the first batches
    # only.
    rotate: int = option(
        0,
        "block-Hadamard rotation of each projection's input, block size (a power of two; "
        "0: off); raw setting",
        type=NONNEG,
    )
    alpha_tokens: int | None = option(
        None,
        "smooth and fold settings: search α on the first calibration batches covering this "
        "many tokens (default: all; the search dominates the quantize time)",
        type=POS,
    )

    def check(self, common) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; supported: {', '.join(SETTINGS)}")
        v = self.rotate
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"rotate must be an int >= 0, got {v!r}")
        if v and v & (v - 1):
            raise ValueError(f"rotate (the Hadamard block) must be a power of two, got {v}")
        if v and self.setting == "smooth":
            raise ValueError("rotate is not combined with the smooth setting (use raw)")
        a = self.alpha_tokens
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueError(f"alpha_tokens must be a positive int or None, got {a!r}")

    def unused(self, common) -> tuple[str, ...]:
        return () if self.setting in ("smooth", "fold") else ("alpha_tokens",)


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
    # beyond ARHQ: arhq_jax/decomposition/rank_budget.py, refine.py.
    rank_budget: bool = option(
        False,
        "spread the factor budget of uniform --rank over the (layer, projection) pairs",
        action="store_true",
    )
    bits_target: float | None = option(
        None,
        "choose each projection's rank (0, 4, 8, … 3×--rank) by the exact knapsack of "
        "rank_budget.allocate_bits so that the stored bits per weight of the quantized "
        "projections (codes, scales, global scales, factors) are at most this",
        type=float_in(0, lo_open=True),
    )
    refine_iters: int = option(
        0,
        "joint refinement of branch and quantized residual: at most this many iterations",
        type=NONNEG,
    )
    refine_gptq: bool = option(
        False,
        "joint refinement: re-quantize the residual by GPTQ (as the final packing) instead of RTN "
        "inside the loop; needs residual_quant=gptq",
        action="store_true",
    )
    act_aware: bool = option(
        False,
        "quantize the residual against the quantized activations: target (W − L)(H − C + λI)"
        "(Ĥ + λI)⁻¹ under Ĥ = E[Q(x)ᵀQ(x)] (refine.act_aware_map); raw setting",
        action="store_true",
    )

    def check(self, common) -> None:
        RTNOptions.check(self, common)
        check_rank(self.rank)
        check_residual_quant(self.residual_quant)
        if self.residual_quant == "gptq":
            GPTQOptions.check(self, common)
        v = self.refine_iters
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"refine_iters must be an int >= 0, got {v!r}")
        if not isinstance(self.rank_budget, bool):
            raise ValueError(f"rank_budget must be True or False, got {self.rank_budget!r}")
        b = self.bits_target
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, int | float) or not 0 < b < float("inf"):
                raise ValueError(f"bits_target must be a finite number > 0, got {b!r}")
            if self.rank_budget:
                raise ValueError("give bits_target or rank_budget, not both")
            if self.rank == 0:
                raise ValueError("bits_target needs a low-rank branch (rank > 0: the grid's top/3)")
        if (self.rank_budget or self.refine_iters) and self.rank == 0:
            raise ValueError("rank_budget and refine_iters need a low-rank branch (rank > 0)")
        if (self.rank_budget or self.refine_iters) and self.setting == "smooth":
            raise ValueError("rank_budget and refine_iters are implemented for the raw setting")
        if not isinstance(self.refine_gptq, bool):
            raise ValueError(f"refine_gptq must be True or False, got {self.refine_gptq!r}")
        if self.refine_gptq and not (self.refine_iters and self.residual_quant == "gptq"):
            raise ValueError("refine_gptq needs refine_iters > 0 and residual_quant=gptq")
        if not isinstance(self.act_aware, bool):
            raise ValueError(f"act_aware must be True or False, got {self.act_aware!r}")
        if self.act_aware and (self.setting == "smooth" or common.act_fmt is None):
            raise ValueError("act_aware needs the raw setting and an activation format")

    def unused(self, common) -> tuple[str, ...]:
        out = RTNOptions.unused(self, common)
        return out if self.residual_quant == "gptq" else out + GPTQ_OPTIONS


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


def split_weight(qcfg, w_t: jax.Array, g: jax.Array | None, factor_dtype, factors=None, rank=None):
    """The low-rank split of ``w_t`` (svdquant, or arhq under ``g``), or None without a branch.

    ``factors``: a ``decompose.GFactorCache`` shared by the projections of one G; ``rank``: this
    projection's rank (the rank budget's), default the recipe's."""
    rank = qcfg.rank if rank is None else rank
    if not qcfg.uses_branch or rank == 0:
        return None
    if qcfg.method == "svdquant":
        return decompose.svdquant(w_t, rank, dtype=factor_dtype)
    if factors is not None:  # one factorization per shared G (q/k/v, gate/up)
        g = factors(g, w_t.shape)
    return decompose.arhq(w_t, g, rank, qcfg.eps, qcfg.rel_eps, dtype=factor_dtype)


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


def _quantize_group(
    layer,
    projs,
    g_of,
    smooth,
    qcfg,
    factor_dtype,
    timings,
    layer_idx,
    h_of,
    act,
    mom_of=None,
    ranks=None,
    spread=None,
):
    """Decompose and pack ``projs`` of ``layer``; returns ({proj: QuantLinear}, diagnostics).

    ``act``: {proj: static activation scale}. ``mom_of`` {proj: moments H, C, G} for
    the joint refinement, ``ranks`` {(layer, proj): rank} of the rank budget. Every projection
    is split first, so that the fused partitions (q/k/v, gate/up) can share one nvfp4 weight
    global scale of their residuals. With an active ``devices.Spread`` every
    projection's inputs go to its own device and all of them are dispatched before any is
    waited on (one device: each is timed on its own, as before)."""
    mom_of = mom_of or {}
    stage = devices.stage_placement(spread, {p: getattr(layer, p).w.shape for p in projs})
    many, order, place = stage.many, stage.order, stage.put

    new, diags, splits, refined, roots, maps = {}, {}, {}, {}, {}, {}
    h_of = dict(h_of)
    factors = decompose.GFactorCache(qcfg.eps, qcfg.rel_eps)
    g_home = {}  # id(G) → G on the device of its first projection: one factorization per G

    def factors_for(p):
        def factor(g, w_shape):
            if id(g) not in g_home:  # g is kept in the entry so that its id is not reused
                g_home[id(g)] = (g, place(g, p))
            return place(factors(g_home[id(g)][1], w_shape), p)

        return factor

    t_all = time.perf_counter()
    for p in order:
        w = place(getattr(layer, p).w, p).astype(jnp.float32)
        if qcfg.rotate:  # the weight of the rotated space, W R
            w = rotate.rotate_weight(w, rotate.block_for(w.shape[1], qcfg.rotate))
        alpha, s = smooth.get(p, (None, None))
        w_t = w if s is None else w * place(s, p)[None, :]
        t0 = time.perf_counter()
        rank = None if ranks is None else ranks[(layer_idx, p)]
        split = split_weight(qcfg, w_t, g_of.get(p), factor_dtype, factors_for(p), rank)
        if not many:
            split = jax.block_until_ready(split)
        grp = GROUP_OF[p]
        quantizer = refine.rtn_quantizer(qcfg.w_spec)
        if qcfg.refine_gptq:  # GPTQ under H (Ĥ when act-aware) inside the loop
            quantizer = _gptq_quantizer(qcfg, h_of, p, place)
        if qcfg.act_aware:  # the residual's target T = res P under Ĥ
            if grp not in maps:
                mom = place(mom_of[p], p)
                lam = refine.act_aware_lambda(mom, qcfg.percdamp)
                maps[grp] = refine.act_aware_map(mom["H"], mom["C"], mom["G"], lam)
            quantizer = refine.mapped_quantizer(quantizer, place(maps[grp][0], p))
            if qcfg.residual_quant == "gptq":  # GPTQ of the target under Ĥ (RTN: no H)
                h_of[p] = maps[grp][1]
        if split is not None and qcfg.refine_iters:  # joint refinement
            mom = place(mom_of[p], p)
            if grp not in roots:
                roots[grp] = refine.h_roots(mom)
            ref = refine.refine(
                w_t,
                split.b,
                split.a,
                mom,
                quantizer,
                qcfg.refine_iters,
                h_roots=place(roots[grp], p),
            )
            split = split.replace(
                b=ref.b, a=ref.a, residual=ref.residual, objective=jnp.asarray(ref.objectives[-1])
            )
            refined[p] = ref.objectives
        if not many:
            timings["decomposition_s"] += time.perf_counter() - t0
        target = w_t if split is None else split.residual
        if qcfg.act_aware:
            target = refine.mapped_quantizer(lambda t: t, place(maps[grp][0], p))(target)
        splits[p] = (split, target)
    if many:  # every device's queue drained: the wall time of the whole stage
        jax.block_until_ready(splits)
        timings["decomposition_s"] += time.perf_counter() - t_all
    fused = qcfg.fused_w_scale and qcfg.w_spec.name == "nvfp4"
    w_scales = global_scales.fused_weight_scales(
        {p: r for p, (_, r) in splits.items()}, GROUP_OF, fused
    )
    t_all = time.perf_counter()
    for p in order:
        lin = getattr(layer, p)
        alpha, s = smooth.get(p, (None, None))
        split, residual = splits[p]
        t1 = time.perf_counter()
        ql = _pack_residual(
            qcfg,
            residual,
            place(h_of.get(p), p),
            place(s, p),
            place(lin.b, p),
            split,
            place(act.get(p), p),
            place(w_scales.get(p), p),
        )
        deq = dequantize(ql.w, jnp.float32)
        if not many:
            deq = jax.block_until_ready(deq)
            timings["packing_s"] += time.perf_counter() - t1
        d = {
            "layer": layer_idx,
            "proj": p,
            "alpha": alpha,
            "w_quant_rel_err": jnp.linalg.norm(deq - residual)
            / jnp.maximum(jnp.linalg.norm(residual), 1e-30),
        }
        if many:
            d["device"] = stage.device_id(p)
        if p in refined:  # J of every accepted refinement iterate
            d["refine_objectives"] = [float(j) for j in refined[p]]
        if split is not None:
            d.update(
                rank=split.rank,
                objective=split.objective,
                n_clamped=split.n_clamped,
                max_abs_a=split.max_abs_a,
                branch_rel_norm=split.branch_rel_norm,
            )
        diags[p] = d
        if qcfg.rotate:  # online rotation of the input
            d["rotate"] = rotate.block_for(residual.shape[1], qcfg.rotate)
            ql = rotate.RotatedLinear(ql, d["rotate"])
        new[p] = ql
    if many:  # back to the calibration mesh, one placement for the whole model
        new = stage.gather(new)
        timings["packing_s"] += time.perf_counter() - t_all
    # One device→host transfer for the group's diagnostics, not one per number.
    return {p: new[p] for p in projs}, [
        _host_diag(d) for d in jax.device_get([diags[p] for p in projs])
    ]


def _gptq_quantizer(qcfg, h_of: dict, p: str, place):
    """``res ↦ deq(GPTQ(res))`` under ``h_of[p]``, read at call time (the act-aware Ĥ replaces
    H in ``h_of`` after this is built) and put on ``p``'s device by ``place``; the residual's
    own weight global scale."""

    def quantize(res):
        h = place(h_of[p], p)
        return dequantize(gptq_weight(res, h, qcfg.w_spec, qcfg).qtensor, jnp.float32)

    return quantize


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
            qcfg.setting in ("smooth", "fold")
            or (qcfg.method == "arhq" and qcfg.uses_branch)
            or qcfg.residual_quant == "gptq"
            or qcfg.static_act_scale
            or bool(qcfg.refine_iters)
            or qcfg.act_aware
        )

    def streams(self, qcfg) -> bool:
        # the rank budget's and the bit budget's plan reads the whole model
        return not (qcfg.rank_budget or qcfg.bits_target is not None)

    def transform_layer(self, layer, calib, qcfg):
        """The fold setting: per-group vectors searched on the float layer and folded into its
        norms and v/up rows (``fold_smoothing``); the stages then quantize it as raw."""
        if qcfg.setting != "fold":
            return layer, {}
        return fold_smoothing.fold_searched(layer, calib, qcfg)

    def plan(self, params, cfg, calib_ids, qcfg, *, batch_size=8, mesh=None):
        """``{(layer, proj): rank}`` of the rank budget (None without one)."""
        if not qcfg.rank_budget and qcfg.bits_target is None:
            return None
        return allocate_model_ranks(params, cfg, calib_ids, qcfg, batch_size, mesh)

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
        smooth, g_of, h_of, act, mom_of = {}, {}, {}, {}, {}
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
            gs, scale, rot = {}, None, qcfg.rotate
            # H, C and G in one pass instead
            moments = bool(qcfg.refine_iters) or qcfg.act_aware
            if static:  # pass 1: the amax (with H when only H is needed: it ignores the scale)
                spec = stats_config(qcfg, g=False, absmax=True, h=need_h and not need_g)
                gs = calib.stats(layer, {g: spec for g in groups}, rotate_block=rot)
                scale = {
                    g: global_scales.act_scale(global_scales.amax(gs[g]["absmax"])) for g in groups
                }
                act = {p: scale[GROUP_OF[p]] for p in projs}
                if need_g and not moments:
                    spec = stats_config(qcfg, g=True, absmax=False, h=need_h)
                    gs = calib.stats(layer, {g: spec for g in groups}, None, scale, rot)
            elif (need_g or need_h) and not moments:
                spec = stats_config(qcfg, g=need_g, absmax=False, h=need_h)
                gs = calib.stats(layer, {g: spec for g in groups}, rotate_block=rot)
            if moments:
                gs = calib.moments(layer, groups, qcfg.act_spec, scale, rot)
                mom_of = {p: gs[GROUP_OF[p]] for p in projs}
            g_of = {p: gs[GROUP_OF[p]]["G"] for p in projs} if need_g else {}
            h_of = {p: gs[GROUP_OF[p]]["H"] for p in projs} if need_h else {}
        jax.block_until_ready((g_of, h_of, act))
        timings["calibration_s"] += time.perf_counter() - t0
        factor_dtype = qcfg.factor_dtype or calib.cfg.param_dtype
        new, diags = _quantize_group(
            layer,
            projs,
            g_of,
            smooth,
            qcfg,
            factor_dtype,
            timings,
            layer_idx,
            h_of,
            act,
            mom_of=mom_of,
            ranks=calib.plan,
            spread=calib.spread,
        )
        return layer.replace(**new), diags

    def check_model(self, qcfg, cfg) -> None:
        if not qcfg.uses_branch:
            return
        if qcfg.bits_target is not None:  # the weights alone within the target (before any work)
            shapes, fixed = zip(*projection_bits(qcfg, cfg).values(), strict=True)
            factor_bits = 8 * jnp.dtype(qcfg.factor_dtype or cfg.param_dtype).itemsize
            rank_budget.bits_budget(shapes, fixed, factor_bits, qcfg.bits_target)
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


# ----------------------------------------------------------------------------- beyond ARHQ


def rank_grid(qcfg, step: int = 8) -> tuple[int, ...]:
    """Candidate ranks of the rank budget: 0, step, … up to 3× the uniform rank (and it)."""
    return tuple(sorted(set(range(0, 3 * qcfg.rank + 1, step)) | {qcfg.rank}))


def projection_bits(qcfg, cfg) -> dict[str, tuple[tuple[int, int], int]]:
    """``{proj: ((out, in), stored bits without a branch)}`` of every quantized projection of
    one layer (``rank_budget.weight_bits``: codes, scales, global scales, the static activation
    scale, the smooth setting's vector, a bias in the parameter dtype)."""
    shapes = cfg.linear_shapes()
    pbits = 8 * jnp.dtype(cfg.param_dtype).itemsize
    return {
        p: (
            shapes[p],
            rank_budget.weight_bits(
                shapes[p],
                qcfg.w_spec,
                act_scale=qcfg.static_act_scale,
                smooth=qcfg.setting == "smooth",
                bias_bits=shapes[p][0] * pbits if has_bias(cfg, p) else 0,
            ),
        )
        for p in qcfg.projections
    }


def allocate_model_ranks(params, cfg, calib_ids, qcfg, batch_size=8, mesh=None) -> dict:
    """``{(layer, proj): rank}`` minimising Σ J_i(r_i) (ARHQ's free tail objective on the float
    model, in the rotated space when ``qcfg.rotate``; SVDQuant's Σ_{j>r} σ_j²(W), of W H½ when
    weight-only) subject to the
    stored factor values of uniform ``qcfg.rank`` (``rank_budget.allocate_ranks``), or, with
    ``qcfg.bits_target``, to at most that many stored bits per weight over the quantized
    projections (``rank_budget.allocate_bits``, ranks 0, 4, … 3× ``qcfg.rank``). One parallel
    calibration pass (absmax, then G with the static activation scale)."""
    bits = qcfg.bits_target is not None
    grid = rank_grid(qcfg, step=4 if bits else 8)
    shapes_of = cfg.linear_shapes()
    runner = None
    # weight-only svdquant: the tails of W H½ (the weight-only output error), not of W
    h_metric = qcfg.method == "svdquant" and qcfg.act_fmt is None
    if qcfg.method == "arhq" or h_metric:
        runner = LayerwiseRunner(params, cfg, calib_ids, batch_size=batch_size, mesh=mesh)
    calib = Calibration(runner, cfg)
    objs, shapes, keys, fixed = [], [], [], []
    fixed_of = projection_bits(qcfg, cfg)
    for li, layer in enumerate(params.layers):
        gs, scale = {}, None
        if runner is not None:
            groups = qcfg.groups
            if qcfg.static_act_scale:
                spec = stats_config(qcfg, g=False, absmax=True)
                am = calib.stats(layer, {g: spec for g in groups}, rotate_block=qcfg.rotate)
                scale = {
                    g: global_scales.act_scale(global_scales.amax(am[g]["absmax"])) for g in groups
                }
            spec = stats_config(qcfg, g=not h_metric, absmax=False, h=h_metric)
            gs = calib.stats(layer, {g: spec for g in groups}, None, scale, qcfg.rotate)
        for p in qcfg.projections:
            w = getattr(layer, p).w.astype(jnp.float32)
            if qcfg.rotate:
                w = rotate.rotate_weight(w, rotate.block_for(w.shape[1], qcfg.rotate))
            if runner is None:
                objs.append(rank_budget.svd_tail_objectives(w, grid))
            else:
                m = gs[GROUP_OF[p]]["H" if h_metric else "G"]
                objs.append(rank_budget.tail_objectives(w, m, grid, qcfg.eps or 1e-6))
            shapes.append(shapes_of[p])
            keys.append((li, p))
            fixed.append(fixed_of[p][1])
        if runner is not None:
            runner.advance(layer)
    objs = np.stack([np.asarray(o) for o in objs])
    if bits:
        factor_bits = 8 * jnp.dtype(qcfg.factor_dtype or cfg.param_dtype).itemsize
        ranks = rank_budget.allocate_bits(objs, shapes, grid, fixed, factor_bits, qcfg.bits_target)
    else:
        ranks = rank_budget.allocate_ranks(objs, shapes, grid, qcfg.rank)
    return dict(zip(keys, ranks, strict=True))
