"""GPTQ, SmoothQuant, FPRAG-AWQ (+ dynamic heuristic) and SERQ as layer quantizers of the
PTQ pipeline (``arhq_jax.quantize_model``); ResQ lives in ``resq_method``.

Each class implements the method protocol of ``quantize_model``: ``needs_calibration(qcfg)``,
``quantize_stage(layer, groups, projs, calib, qcfg, layer_idx, timings) -> (layer, diagnostics)``
and optionally ``finish(qparams, cfg, calib, qcfg)``. The numerics are the per-linear algorithms of
``gptq``, ``smoothquant``, ``awq`` and ``serq``; here they only meet calibration statistics
(``Calibration.stats`` / ``inputs`` / ``head_*``) and become packed linears (``QuantLinear`` or
``SERQLinear`` holding ``QTensor`` s) that ``arhq_jax.checkpoint`` saves as they are.

Time split: statistics and token sampling count as ``calibration_s``, the per-linear solves
(GPTQ, the AWQ α search, SERQ) as ``decomposition_s``, quantize/pack as ``packing_s``.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
from flax import struct

from arhq_jax import formats as F
from arhq_jax import global_scales as GS
from arhq_jax.methods import awq, serq, smoothquant
from arhq_jax.methods.gptq import gptq_quantize
from arhq_jax.models.config import GROUP_OF, INPUT_GROUPS
from arhq_jax.qlinear import QuantLinear
from arhq_jax.stats import StatsConfig

AWQ_TOKENS = 2048  # FPRAG: at most 2,048 random stored tokens per linear (1,024 for lm_head)
AWQ_HEAD_TOKENS = 1024
AWQ_HEAD_CHUNKS = 4
# SmoothQuant folds into the RMSNorm that feeds each of these groups.
SQ_FOLD = {"qkv": "input_norm", "gate_up": "post_norm"}


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    t0 = time.perf_counter()
    yield
    timings[key] += time.perf_counter() - t0


def _rel_err(w_hat, w) -> float:
    w = jnp.asarray(w, jnp.float32)
    return float(jnp.linalg.norm(w_hat - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30))


def _group_stats(calib, layer, groups, qcfg, **keep) -> dict:
    spec = StatsConfig(dtype=qcfg.stats_dtype, **{"keep_absmax": False, **keep})
    out = calib.stats(layer, {g: spec for g in groups})
    return jax.block_until_ready(out)


def _f32(a):
    return None if a is None else jnp.asarray(a, jnp.float32)


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
# GPTQ
# ----------------------------------------------------------------------------------------------


def gptq_spec(qcfg) -> F.FormatSpec:
    """The weight format with the reference quantizer's int scale clamp (≥ 1e-5)."""
    spec = qcfg.w_spec
    return F.resolve_format(spec, int_variant="gptq") if spec.is_int else spec


def gptq_linear(w, h, qcfg, bias=None, *, act_scale=None, w_scale=None):
    """GPTQ of ``w [out, in]`` under ``h`` → (``QuantLinear``, ``GPTQResult``).

    ``act_scale``: static nvfp4 activation global scale (None: dynamic); ``w_scale``: nvfp4
    weight global scale (None: from ``w``; a joint one shares it across fused partitions)."""
    spec = gptq_spec(qcfg)
    res = gptq_quantize(
        w,
        h,
        spec,
        percdamp=qcfg.percdamp,
        block_size=qcfg.block_size,
        act_order=qcfg.act_order,
        static_groups=qcfg.act_order and spec.block != -1,
        mse_clip=qcfg.mse_clip,
        tensor_scale=w_scale,
    )
    if act_scale is not None:
        act_scale = jnp.asarray(act_scale, jnp.float32).reshape(())
    return QuantLinear(w=res.qtensor, bias=bias, act_scale=act_scale, act_fmt=qcfg.act_spec), res


def _static_act_scales(qcfg, st: dict, projs) -> dict:
    """{proj: static nvfp4 activation scale} from the groups' absmax, or {} (dynamic/other)."""
    if not qcfg.static_act_scale:
        return {}
    scale = {g: GS.act_scale(GS.amax(v["absmax"])) for g, v in st.items()}
    return {p: scale[GROUP_OF[p]] for p in projs}


def _fused_w_scales(qcfg, weights: dict) -> dict:
    """{proj: nvfp4 weight global scale shared by its fused partitions}, or {} when off."""
    return GS.fused_weight_scales(
        weights, GROUP_OF, qcfg.fused_w_scale and qcfg.w_spec.name == "nvfp4"
    )


class GPTQMethod:
    """GPTQ (docs/spec/methods.md §5) on H = XᵀX/N of each input group (sequential by default).

    NVFP4 activations get the static scale of the group's amax (same pass as H); NVFP4 weights
    of fused partitions share the global scale of their joint amax."""

    def needs_calibration(self, qcfg) -> bool:
        return True

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        static = qcfg.static_act_scale
        with _timed(timings, "calibration_s"):
            st = _group_stats(calib, layer, groups, qcfg, keep_h=True, keep_absmax=static)
        act = _static_act_scales(qcfg, st, projs)
        w_scales = _fused_w_scales(qcfg, {p: getattr(layer, p).w for p in projs})
        new, diags = {}, []
        for p in projs:
            lin = getattr(layer, p)
            w = _f32(lin.w)
            with _timed(timings, "decomposition_s"):
                ql, res = gptq_linear(
                    w,
                    st[GROUP_OF[p]]["H"],
                    qcfg,
                    lin.b,
                    act_scale=act.get(p),
                    w_scale=w_scales.get(p),
                )
                jax.block_until_ready(res.w_hat)
            new[p] = ql
            diags.append(
                {
                    "layer": layer_idx,
                    "proj": p,
                    "w_quant_rel_err": _rel_err(res.w_hat, w),
                    "gptq_err": float(res.err),
                }
            )
        return layer.replace(**new), diags


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
        s = smoothquant.smoothquant_scales(_f32(m_x), ws, alpha)
        norm, new_ws = smoothquant.fold_smoothing(getattr(layer, SQ_FOLD[g]), ws, s)
        upd = {p: getattr(layer, p).replace(w=nw) for p, nw in zip(projs, new_ws, strict=True)}
        layer = layer.replace(**{SQ_FOLD[g]: norm}, **upd)
        scales[g] = s
    return layer, scales


class SmoothQuantMethod:
    """SmoothQuant (docs/spec/methods.md §4): α migration folded into the RMSNorm before q/k/v and
    before
    gate/up (one scale per group), then RTN of every projection (o and down unsmoothed).

    Int activations are quantized per token by default (SmoothQuant's dynamic per-token O1
    setting, ``act_group_size=-1``). NVFP4 activations get the static scale of the input the
    quantizer sees (measured on the folded layer, one per group); NVFP4 weights of fused
    partitions share the global scale of their joint amax (of W·s).
    """

    def needs_calibration(self, qcfg) -> bool:
        return True

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        fold = [g for g in groups if g in SQ_FOLD]
        scales = {}
        fp = layer
        if fold:
            with _timed(timings, "calibration_s"):
                st = _group_stats(calib, layer, fold, qcfg, keep_absmax=True)
            layer, scales = smoothquant_fold(layer, {g: st[g]["absmax"] for g in fold}, qcfg.alpha)
        act_scales = {}
        if qcfg.static_act_scale:  # the folded norms' output is what the quantizer reads
            with _timed(timings, "calibration_s"):
                st = _group_stats(calib, layer, groups, qcfg, keep_absmax=True)
            act_scales = _static_act_scales(qcfg, st, projs)
        act = qcfg.act_spec  # int: per token by default (act_group_size -1)
        w_ts = {}
        for p in projs:
            s = scales.get(GROUP_OF[p])
            w = _f32(getattr(fp, p).w)
            w_ts[p] = w if s is None else w * s[None, :]  # quantize the f32 product
        w_scales = _fused_w_scales(qcfg, w_ts)
        new, diags = {}, []
        with _timed(timings, "packing_s"):
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
                        "w_quant_rel_err": _rel_err(F.dequantize(ql.w, jnp.float32), w_t),
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


class AWQMethod:
    """FPRAG-AWQ (docs/spec/methods.md §6): per linear, the α grid search of s = E[x²]^α on ≤ 2,048
    stored tokens, int4-asym g128 weight-only; ``rounding="dh"`` for the dynamic heuristic.

    The packed linear keeps s as its input divisor (x/s)·Q(W diag s)ᵀ. ``finish`` quantizes
    lm_head in 4 chunks (on ≤ 1,024 tokens of its input) when ``qcfg.quantize_lm_head``.
    """

    def __init__(self, rounding: str = "rne"):
        self.rounding = rounding

    def needs_calibration(self, qcfg) -> bool:
        return True

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        with _timed(timings, "calibration_s"):
            st = _group_stats(calib, layer, groups, qcfg, keep_moments=True)
            xs = {g: calib.inputs(layer, g, AWQ_TOKENS, seed=qcfg.seed + layer_idx) for g in groups}
        new, diags = {}, []
        for p in projs:
            lin = getattr(layer, p)
            w = _f32(lin.w)
            g = GROUP_OF[p]
            with _timed(timings, "decomposition_s"):
                ql, res = awq_linear(w, xs[g], st[g], qcfg, self.rounding, lin.b)
                jax.block_until_ready(res.w_hat)
            new[p] = ql
            diags.append(
                {
                    "layer": layer_idx,
                    "proj": p,
                    "alpha": float(res.alpha[0]),
                    "w_quant_rel_err": _rel_err(res.w_hat, w),
                }
            )
        return layer.replace(**new), diags

    def finish(self, qparams, cfg, calib, qcfg):
        if not qcfg.quantize_lm_head:
            return qparams
        spec = StatsConfig(keep_absmax=False, keep_moments=True, dtype=qcfg.stats_dtype)
        with jax.enable_x64(qcfg.stats_dtype == "float64"):
            moments = calib.head_stats(qparams.final_norm, spec)
            moments = {k: _f32(v) for k, v in moments.items() if k != "count"}
        x = calib.head_inputs(qparams.final_norm, AWQ_HEAD_TOKENS, seed=qcfg.seed)
        head = qparams.lm_head
        w = _f32(qparams.embed if head is None else head.w)
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


class SERQMethod:
    """SERQ (docs/spec/methods.md §7): static flattening by the calibration absmax, saliency
    permutation,
    one quantized compensation matrix on the r most salient channels read from the same
    quantized activations; main weight by RTN or GPTQ (``residual_quant``, int path)."""

    def needs_calibration(self, qcfg) -> bool:
        return True

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        with _timed(timings, "calibration_s"):
            st = _group_stats(
                calib, layer, groups, qcfg, keep_minmax=True, keep_h=qcfg.residual_quant == "gptq"
            )
        new, diags = {}, []
        for p in projs:
            lin = getattr(layer, p)
            w = _f32(lin.w)
            with _timed(timings, "decomposition_s"):
                sl = serq_linear(w, st[GROUP_OF[p]], qcfg, lin.b)
                w_eff = serq.serq_transform(w, sl.s, sl.perm)
                w_hat = F.dequantize(sl.w_main, jnp.float32)
                if sl.rank:
                    w_hat = w_hat.at[:, : sl.rank].add(F.dequantize(sl.c, jnp.float32))
            new[p] = sl
            diags.append({"layer": layer_idx, "proj": p, "w_quant_rel_err": _rel_err(w_hat, w_eff)})
        return layer.replace(**new), diags
