"""SmoothQuant, FPRAG-AWQ (+ dynamic heuristic) and SERQ as methods of the PTQ pipeline
(``arhq_jax.run.quantize``); GPTQ lives in ``gptq_method``, ResQ in ``resq_method``, the
low-rank family in ``lowrank``.

Each class is a ``methods.base.Method``: ``needs_calibration(qcfg)``,
``quantize_stage(layer, groups, projs, calib, qcfg, layer_idx, timings) -> (layer, diagnostics)``
and optionally ``finish(qparams, cfg, calib, qcfg)``; its ``Options`` dataclass holds its
options. The numerics are the per-linear algorithms of ``smoothquant``, ``awq`` and ``serq``;
here they only meet calibration statistics
(``Calibration.stats`` / ``inputs`` / ``head_*``) and become packed linears (``QuantLinear`` or
``SERQLinear`` holding ``QTensor`` s) that ``arhq_jax.checkpoint.store`` saves as they are.

Time split: statistics and token sampling count as ``calibration_s``, the per-linear solves
(GPTQ, the AWQ α search, SERQ) as ``decomposition_s``, quantize/pack as ``packing_s``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

import arhq_jax.methods.awq as awq
import arhq_jax.methods.serq as serq
import arhq_jax.methods.smoothquant as smoothquant
from arhq_jax.calibration import global_scales as GS
from arhq_jax.calibration.stats import StatsConfig
from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.methods.argtypes import NONNEG, float_in
from arhq_jax.methods.base import (
    GPTQ_CORE_OPTIONS,
    GPTQCoreOptions,
    Method,
    MethodFormats,
    Options,
    check_rank,
    check_residual_quant,
    option,
)
from arhq_jax.methods.util import (
    f32,
    fused_w_scales,
    group_stats,
    rel_err,
    static_act_scales,
    timed,
)
from arhq_jax.models.config import GROUP_OF, INPUT_GROUPS
from arhq_jax.numerics import formats as F

AWQ_TOKENS = 2048  # FPRAG: at most 2,048 random stored tokens per linear (1,024 for lm_head)
AWQ_HEAD_TOKENS = 1024
AWQ_HEAD_CHUNKS = 4
# SmoothQuant folds into the RMSNorm that feeds each of these groups.
SQ_FOLD = {"qkv": "input_norm", "gate_up": "post_norm"}


@struct.dataclass
class OutSplitLinear:
    """Row blocks of one projection, each its own linear: ``y = concat_i(part_i(x))``.

    FPRAG's lm_head: 4 chunks along ``out``, each with its own AWQ scale (a ``QuantLinear``).
    """

    parts: tuple

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([p(x) for p in self.parts], axis=-1)


# ----------------------------------------------------------------------------------------------
# SmoothQuant
# ----------------------------------------------------------------------------------------------


def smoothquant_fold(layer, absmax: dict, alpha: float):
    """Fold SmoothQuant scales into ``layer``'s norms and the consumers' weights.

    Args:
      absmax: ``{group: [in] max|x|}`` for groups among ``qkv`` and ``gate_up``.
    Returns:
      ``(layer, {group: s})``: γ ← γ/s, W ← W diag(s) for every consumer of the group (the
      unquantized layer computes the same function).
    """
    scales = {}
    for g, m_x in absmax.items():
        if g not in SQ_FOLD:
            raise ValueError(f"SmoothQuant folds into norms of {tuple(SQ_FOLD)}, not {g!r}")
        projs = INPUT_GROUPS[g]
        ws = [getattr(layer, p).w for p in projs]
        s = smoothquant.smoothquant_scales(f32(m_x), ws, alpha)
        norm, new_ws = smoothquant.fold_smoothing(getattr(layer, SQ_FOLD[g]), ws, s)
        upd = {p: getattr(layer, p).replace(w=nw) for p, nw in zip(projs, new_ws, strict=True)}
        layer = layer.replace(**{SQ_FOLD[g]: norm}, **upd)
        scales[g] = s
    return layer, scales


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions(Options):
    alpha: float = option(0.5, "SmoothQuant's migration strength α", type=float_in(0, 1))

    def check(self, common) -> None:
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


class SmoothQuantMethod(Method):
    """SmoothQuant (docs/spec/methods.md §4): α migration folded into the RMSNorm before q/k/v and
    before
    gate/up (one scale per group), then RTN of every projection (o and down unsmoothed).

    Int activations are quantized per token by default (SmoothQuant's dynamic per-token O1
    setting, ``act_group_size=-1``). NVFP4 activations get the static scale of the input the
    quantizer sees (measured on the folded layer, one per group); NVFP4 weights of fused
    partitions share the global scale of their joint amax (of W·s).
    """

    name = "smoothquant"
    # W8A8 int8 (per-channel weights, per-token activations), or any W4A4.
    formats = MethodFormats(
        ("int8", "int4", "nvfp4", "nvfp4-paper", "mxfp4"),
        ("int8", "int4", "nvfp4", "mxfp4"),
        "int8",
        "int8",
        group_default=-1,
        act_group_default=-1,
    )
    Options = SmoothQuantOptions
    fused_w_scale = True

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        fold = [g for g in groups if g in SQ_FOLD]
        scales = {}
        fp = layer
        if fold:
            with timed(timings, "calibration_s"):
                st = group_stats(calib, layer, fold, qcfg, keep_absmax=True)
            layer, scales = smoothquant_fold(layer, {g: st[g]["absmax"] for g in fold}, qcfg.alpha)
        act_scales = {}
        if qcfg.static_act_scale:  # the folded norms' output is what the quantizer reads
            with timed(timings, "calibration_s"):
                st = group_stats(calib, layer, groups, qcfg, keep_absmax=True)
            act_scales = static_act_scales(qcfg, st, projs)
        act = qcfg.act_spec  # int: per token by default (act_group_size -1)
        w_ts = {}
        for p in projs:
            s = scales.get(GROUP_OF[p])
            w = f32(getattr(fp, p).w)
            w_ts[p] = w if s is None else w * s[None, :]  # quantize the f32 product
        w_scales = fused_w_scales(qcfg, w_ts)
        new, diags = {}, []
        with timed(timings, "packing_s"):
            for p in projs:
                s = scales.get(GROUP_OF[p])
                w_t = w_ts[p]
                ql = QuantLinear.from_float(
                    w_t,
                    None,
                    None,
                    qcfg.w_spec,
                    act,
                    bias=getattr(fp, p).b,
                    act_scale=act_scales.get(p),
                    w_tensor_scale=w_scales.get(p),
                )
                new[p] = ql
                diags.append(
                    {
                        "layer": layer_idx,
                        "proj": p,
                        "alpha": qcfg.alpha if s is not None else None,
                        "w_quant_rel_err": rel_err(F.dequantize(ql.w, jnp.float32), w_t),
                    }
                )
        return layer.replace(**new), diags


# ----------------------------------------------------------------------------------------------
# FPRAG-AWQ and its dynamic heuristic
# ----------------------------------------------------------------------------------------------


def awq_linear(w, x, moments, qcfg, rounding, bias=None, n_out_chunks=1):
    """FPRAG-AWQ of ``w [out, in]`` on tokens ``x`` and the input's E[x²]/E[x] → (linear, α)."""
    kw = {"rounding": rounding, "group_size": qcfg.group_size}
    mean = moments["mean"] if rounding == "dh" else None
    res = awq.awq_quantize(w, x, moments["mean_sq"], mean_x=mean, n_out_chunks=n_out_chunks, **kw)
    out = w.shape[0]
    size = out // n_out_chunks
    parts = []
    for i in range(n_out_chunks):
        a, b = i * size, (out if i == n_out_chunks - 1 else (i + 1) * size)
        s = res.scales[i]
        qt = awq.awq_qtensor(w[a:b], s, mean_x=mean, **kw)
        bb = None if bias is None else bias[a:b]
        parts.append(QuantLinear(w=qt, smooth=s, bias=bb))
    lin = parts[0] if n_out_chunks == 1 else OutSplitLinear(parts=tuple(parts))
    return lin, res


@dataclasses.dataclass(frozen=True)
class AWQOptions(Options):
    quantize_lm_head: bool = option(
        True,
        "also quantize lm_head, in 4 output chunks (as FPRAG does)",
        flag="--lm-head",
        action="BooleanOptionalAction",
    )
    seed: int = option(0, "seed of the token sampling (AWQ) or the rotations (ResQ)", type=int)


class AWQMethod(Method):
    """FPRAG-AWQ (docs/spec/methods.md §6): per linear, the α grid search of s = E[x²]^α on ≤ 2,048
    stored tokens, int4-asym g128 weight-only; ``rounding="dh"`` for the dynamic heuristic.

    The packed linear keeps s as its input divisor (x/s)·Q(W diag s)ᵀ. ``finish`` quantizes
    lm_head in 4 chunks (on ≤ 1,024 tokens of its input) when ``qcfg.quantize_lm_head``.
    """

    # int4 asymmetric [0, 15], group 128, weight-only; inputs from the partially quantized
    # model (sequential).
    formats = MethodFormats(
        ("int4-asym",), (None,), "int4-asym", None, group_default=128, sequential_default=True
    )
    Options = AWQOptions
    own_act_quantizer = True

    def __init__(self, rounding: str = "rne", name: str = "awq"):
        self.rounding = rounding
        self.name = name

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        with timed(timings, "calibration_s"):
            st = group_stats(calib, layer, groups, qcfg, keep_moments=True)
            xs = {g: calib.inputs(layer, g, AWQ_TOKENS, seed=qcfg.seed + layer_idx) for g in groups}
        new, diags = {}, []
        for p in projs:
            lin = getattr(layer, p)
            w = f32(lin.w)
            g = GROUP_OF[p]
            with timed(timings, "decomposition_s"):
                ql, res = awq_linear(w, xs[g], st[g], qcfg, self.rounding, lin.b)
                jax.block_until_ready(res.w_hat)
            new[p] = ql
            diags.append(
                {
                    "layer": layer_idx,
                    "proj": p,
                    "alpha": float(res.alpha[0]),
                    "w_quant_rel_err": rel_err(res.w_hat, w),
                }
            )
        return layer.replace(**new), diags

    def finishes(self, qcfg) -> bool:
        return qcfg.quantize_lm_head

    def finish(self, qparams, cfg, calib, qcfg):
        if not qcfg.quantize_lm_head:
            return qparams
        spec = StatsConfig(keep_absmax=False, keep_moments=True, dtype=qcfg.stats_dtype)
        with jax.enable_x64(qcfg.stats_dtype == "float64"):
            moments = calib.head_stats(qparams.final_norm, spec)
            moments = {k: f32(v) for k, v in moments.items() if k != "count"}
        x = calib.head_inputs(qparams.final_norm, AWQ_HEAD_TOKENS, seed=qcfg.seed)
        head = qparams.lm_head
        w = f32(qparams.embed if head is None else head.w)
        bias = None if head is None else head.b
        lin, _ = awq_linear(w, x, moments, qcfg, self.rounding, bias, AWQ_HEAD_CHUNKS)
        return qparams.replace(lm_head=lin)


# ----------------------------------------------------------------------------------------------
# SERQ
# ----------------------------------------------------------------------------------------------

SERQ_PATHS = {"mxfp4": "mxfp4", "int4": "int", "nvfp4": "nvfp4"}


def serq_linear(w, st, qcfg, bias=None):
    """SERQ of ``w [out, in]`` from the input's min/max (and H for GPTQ) → packed SERQLinear.

    NVFP4 activations: the static scale of x̃'s calibration amax (exact from min/max) unless
    ``qcfg.act_scale == "dynamic"``."""
    path = SERQ_PATHS[qcfg.w_fmt]
    w_fmt = None
    if path == "int" and qcfg.group_size is not None:
        w_fmt = F.resolve_format(serq.MAIN_INT_FMT, group_size=qcfg.group_size)
    act_scale = None
    if qcfg.static_act_scale:
        act_scale = GS.act_scale(serq.serq_input_amax(st["min"], st["max"]))
    gptq = qcfg.residual_quant == "gptq"
    kw = {"percdamp": qcfg.percdamp, "block_size": qcfg.block_size} if gptq else {}
    return serq.serq_quantize(
        w,
        st["min"],
        st["max"],
        path=path,
        r=qcfg.rank,
        w_quant=qcfg.residual_quant,
        h=st.get("H") if gptq else None,
        act=qcfg.act_fmt,
        w_fmt=w_fmt,
        bias=bias,
        pack=True,
        act_scale=act_scale,
        **kw,
    )


@dataclasses.dataclass(frozen=True)
class SERQOptions(GPTQCoreOptions):
    rank: int = option(128, "SERQ's number r of compensated salient channels", type=NONNEG)
    residual_quant: str = option(
        "rtn", "quantizer of SERQ's main weight (int path): rtn or gptq", choices=("rtn", "gptq")
    )

    def check(self, common) -> None:
        check_rank(self.rank)
        check_residual_quant(self.residual_quant)
        if self.residual_quant == "gptq":
            if common.w_fmt != "int4":
                raise ValueError("SERQ uses GPTQ on the int path only (weight format int4)")
            GPTQCoreOptions.check(self, common)

    def unused(self, common) -> tuple[str, ...]:
        return () if self.residual_quant == "gptq" else GPTQ_CORE_OPTIONS


class SERQMethod(Method):
    """SERQ (docs/spec/methods.md §7): static flattening by the calibration absmax, saliency
    permutation,
    one quantized compensation matrix on the r most salient channels read from the same
    quantized activations; main weight by RTN or GPTQ (``residual_quant``, int path)."""

    name = "serq"
    # The MXFP4 path (C and main MXFP4, MXFP4 activations), the int path (C int4 per row, main
    # int4 g128, SERQ's asymmetric per-token g128 activations, 4 or 8 bits) and, as an
    # extension, an NVFP4 path built like the MXFP4 one.
    formats = MethodFormats(
        ("mxfp4", "int4", "nvfp4"),
        ("mxfp4", "int4", "int8", "nvfp4", None),
        "mxfp4",
        "mxfp4",
        paths={"mxfp4": ("mxfp4", None), "int4": ("int4", "int8", None), "nvfp4": ("nvfp4", None)},
    )
    Options = SERQOptions
    own_act_quantizer = True

    def check_model(self, qcfg, cfg) -> None:
        for name, (_, in_f) in cfg.linear_shapes().items():
            if name in qcfg.projections and qcfg.rank > in_f:
                raise ValueError(
                    f"SERQ r={qcfg.rank} compensated channels exceed {name}'s {in_f} inputs"
                )

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        with timed(timings, "calibration_s"):
            st = group_stats(
                calib, layer, groups, qcfg, keep_minmax=True, keep_h=qcfg.residual_quant == "gptq"
            )
        new, diags = {}, []
        for p in projs:
            lin = getattr(layer, p)
            w = f32(lin.w)
            with timed(timings, "decomposition_s"):
                sl = serq_linear(w, st[GROUP_OF[p]], qcfg, lin.b)
                w_eff = serq.serq_transform(w, sl.s, sl.perm)
                w_hat = F.dequantize(sl.w_main, jnp.float32)
                if sl.rank:
                    w_hat = w_hat.at[:, : sl.rank].add(F.dequantize(sl.c, jnp.float32))
            new[p] = sl
            diags.append({"layer": layer_idx, "proj": p, "w_quant_rel_err": rel_err(w_hat, w_eff)})
        return layer.replace(**new), diags
