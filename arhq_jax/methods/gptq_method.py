"""GPTQ as a method of the pipeline (docs/spec/methods.md §5), and the one GPTQ weight call that
every method quantizing with GPTQ goes through (``gptq_weight``: ``--method gptq``, and the
``residual_quant="gptq"`` of svdquant/arhq).

The integer weight formats take the reference quantizer's scale rule (``int_rule="gptq"``: the
amax, or hi − lo, clamped at ≥ 1e-5 before dividing by the code range), whichever method calls
GPTQ: the residual of SVDQuant/ARHQ under ``--residual-quant gptq`` is quantized exactly as
``--method gptq`` quantizes a weight.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.methods.base import ALL_ACTS, LINEAR_FORMATS, GPTQOptions, Method, MethodFormats
from arhq_jax.methods.gptq import GPTQResult, gptq_quantize
from arhq_jax.methods.util import (
    device_rel_err,
    f32,
    fused_w_scales,
    group_stats,
    static_act_scales,
    timed,
)
from arhq_jax.models.config import GROUP_OF
from arhq_jax.numerics import formats as F
from arhq_jax.parallel import devices


def gptq_int_rule(w_spec) -> str:
    """The int scale rule GPTQ quantizes ``w_spec`` with: the reference quantizer's clamp (≥ 1e-5,
    ``"gptq"``) for int formats; the FP4 formats have no int rule (``"default"``)."""
    return "gptq" if F.resolve_format(w_spec).is_int else "default"


def gptq_weight(w, h, w_spec, opts, *, w_scale=None) -> GPTQResult:
    """GPTQ of ``w [out, in]`` under ``h [in, in]`` in ``w_spec`` with the GPTQ options of
    ``opts`` (``percdamp``, ``block_size``, ``act_order`` — static groups when grouped —,
    ``mse_clip``); ``w_scale``: the nvfp4 weight global scale (None: from ``w``)."""
    spec = F.resolve_format(w_spec)
    return gptq_quantize(
        w,
        h,
        spec,
        percdamp=opts.percdamp,
        block_size=opts.block_size,
        act_order=opts.act_order,
        static_groups=opts.act_order and spec.block != -1,
        mse_clip=opts.mse_clip,
        tensor_scale=w_scale,
        int_rule=gptq_int_rule(spec),
    )


def gptq_linear(w, h, qcfg, bias=None, *, act_scale=None, w_scale=None):
    """GPTQ of ``w [out, in]`` under ``h`` → (``QuantLinear``, ``GPTQResult``).

    ``act_scale``: static nvfp4 activation global scale (None: dynamic); ``w_scale``: nvfp4
    weight global scale (None: from ``w``; a joint one shares it across fused partitions)."""
    res = gptq_weight(w, h, qcfg.w_spec, qcfg, w_scale=w_scale)
    if act_scale is not None:
        act_scale = jnp.asarray(act_scale, jnp.float32).reshape(())
    return QuantLinear(w=res.qtensor, bias=bias, act_scale=act_scale, act_fmt=qcfg.act_spec), res


class GPTQMethod(Method):
    """GPTQ (docs/spec/methods.md §5) on H = XᵀX/N of each input group (sequential by default).

    NVFP4 activations get the static scale of the group's amax (same pass as H); NVFP4 weights
    of fused partitions share the global scale of their joint amax."""

    name = "gptq"
    # int4 sym per output channel, weight-only (group 128 with --group-size 128); also the FP4
    # formats W4A4. Sequential calibration, as in the reference.
    formats = MethodFormats(
        LINEAR_FORMATS, ALL_ACTS, "int4", None, group_default=-1, sequential_default=True
    )
    Options = GPTQOptions
    fused_w_scale = True

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        static = qcfg.static_act_scale
        with timed(timings, "calibration_s"):
            st = group_stats(calib, layer, groups, qcfg, keep_h=True, keep_absmax=static)
        act = static_act_scales(qcfg, st, projs)
        w_scales = fused_w_scales(qcfg, {p: getattr(layer, p).w for p in projs})
        # with several devices each projection runs on its own one, all dispatched
        # before any is waited on (arhq_jax.parallel.devices); one device: as before, one at a time.
        stage = devices.stage_placement(calib.spread, {p: getattr(layer, p).w.shape for p in projs})
        many, order, place = stage.many, stage.order, stage.put

        new, diags, t0 = {}, {}, time.perf_counter()
        for p in order:
            lin = getattr(layer, p)
            w = place(f32(lin.w), p)
            t1 = time.perf_counter()
            ql, res = gptq_linear(
                w,
                place(st[GROUP_OF[p]]["H"], p),
                qcfg,
                place(lin.b, p),
                act_scale=place(act.get(p), p),
                w_scale=place(w_scales.get(p), p),
            )
            if not many:
                jax.block_until_ready(res.w_hat)
                timings["decomposition_s"] += time.perf_counter() - t1
            new[p] = ql
            # Device scalars only: the f32 weight and GPTQ's w_hat are not kept past this step.
            diags[p] = (device_rel_err(res.w_hat, w), res.err)
        if many:
            new = stage.gather(new)
            timings["decomposition_s"] += time.perf_counter() - t0
        out = []
        for p, (err, gptq_err) in zip(
            projs, jax.device_get([diags[p] for p in projs]), strict=True
        ):
            row = {"layer": layer_idx, "proj": p, "w_quant_rel_err": float(err)}
            row["gptq_err"] = float(gptq_err)
            if many:
                row["device"] = stage.device_id(p)
            out.append(row)
        return layer.replace(**new), out
