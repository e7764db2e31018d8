"""Static NVFP4 activation scales and fused weight global scales.

References are independent: numpy amax of the captured linear inputs, numpy float64 EᵀE/N with
the numpy NVFP4 fake-quantizer (``_fp4_numpy``), numpy reductions of the float weights. Scales
are compared bit for bit (as f32) against ``formats.nvfp4_tensor_scale`` of those maxima, the
one definition of an nvfp4 global scale.
"""

from __future__ import annotations

import _fp4_numpy as npq
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.calibration import global_scales
from arhq_jax.calibration.calibrate import LayerwiseRunner
from arhq_jax.cli.main import build_parser
from arhq_jax.decomposition import decompose
from arhq_jax.methods import lowrank, serq
from arhq_jax.models import transformer
from arhq_jax.models.config import INPUT_GROUPS
from arhq_jax.models.params import random_params
from arhq_jax.numerics import formats
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

W4A4 = {"w_fmt": "nvfp4", "act_fmt": "nvfp4"}
RECIPES = {
    "rtn": {"method": "rtn"},
    "arhq": {"method": "arhq", "rank": 4},
    "arhq-smooth": {"method": "arhq", "rank": 4, "setting": "smooth"},
    "svdquant-gptq": {"method": "svdquant", "rank": 4, "residual_quant": "gptq"},
    "gptq": {"method": "gptq", "sequential": False, **W4A4},
    "smoothquant": {"method": "smoothquant", **W4A4},
    "serq": {"method": "serq", "rank": 16, **W4A4},
}


@pytest.fixture(scope="module")
def tiny():
    """``(params, calib [6, 64], eval [4, 64])``; at 64 tokens XLA's CPU float forward of this
    model is itself batch-invariant (at some shapes its row reductions are not, in the last bit),
    so any batch dependence seen here is the quantizer's."""
    params = random_params(CFG, jax.random.key(0), std=0.08)
    ids = jax.random.randint(jax.random.key(1), (10, 64), 0, CFG.vocab_size)
    ids = np.asarray(ids, np.int32)
    return params, ids[:6], ids[6:]


_QUANTIZED = {}


def _quantize(tiny, name, **extra):
    key = (name, tuple(sorted(extra.items())))
    if key not in _QUANTIZED:
        params, calib, _ = tiny
        qcfg = QuantConfig(**RECIPES[name], **extra)
        _QUANTIZED[key] = quantize_model(params, CFG, calib, qcfg, batch_size=2, progress=False)
    return _QUANTIZED[key].params


def _batch_gap(params, ids):
    """(bit-identical?, max |Δ|) of the logits of ``ids`` as one batch vs one by one."""
    together = np.asarray(transformer.forward(params, CFG, ids))
    alone = np.concatenate(
        [np.asarray(transformer.forward(params, CFG, ids[i : i + 1])) for i in range(len(ids))]
    )
    return np.array_equal(together, alone), float(np.max(np.abs(together - alone)))


def _captured(params, calib, batch_size=2):
    """Per layer, per input group: the real calibration tokens each linear reads (numpy f32
    ``[N, D]``), and the per-batch split (parallel mode: the float model)."""
    runner = LayerwiseRunner(params, CFG, calib, batch_size=batch_size)
    out = []
    for layer in params.layers:
        per = {g: [] for g in INPUT_GROUPS}
        for cap, mask in runner.captures(layer):
            m = np.asarray(mask)
            for g in INPUT_GROUPS:
                per[g].append(np.asarray(cap[g], np.float32)[m])
        out.append(per)
        runner.advance(layer)
    return out


def _scale_of(amax) -> np.float32:
    return np.float32(formats.nvfp4_tensor_scale(jnp.float32(amax)))


# ------------------------------------------------------------------------------ batch invariance


def test_float_model_is_batch_invariant_at_this_shape(tiny):
    params, _, ids = tiny
    same, gap = _batch_gap(params, ids)
    assert same, f"the float forward itself moves by {gap} with the batch: the tests below need it"


@pytest.mark.parametrize("name", list(RECIPES))
def test_static_scales_make_logits_batch_invariant(tiny, name):
    params = _quantize(tiny, name)
    same, gap = _batch_gap(params, tiny[2])
    assert same, f"{name}: logits at batch 4 and batch 1 differ by up to {gap}"


@pytest.mark.parametrize("name", ["rtn", "arhq", "gptq", "serq"])
def test_dynamic_scales_make_logits_batch_dependent(tiny, name):
    params = _quantize(tiny, name, act_scale="dynamic")
    same, gap = _batch_gap(params, tiny[2])
    assert not same and gap > 1e-3, f"{name}: dynamic scales should move logits, gap {gap}"


# ------------------------------------------------------------------------------ the static scale


@pytest.mark.parametrize("name", ["rtn", "arhq", "svdquant-gptq", "gptq"])
def test_static_scale_is_the_scale_of_the_captured_input_amax(tiny, name):
    params, calib, _ = tiny
    qparams = _quantize(tiny, name)
    caps = _captured(params, calib)
    for li, layer in enumerate(qparams.layers):
        for g, projs in INPUT_GROUPS.items():
            want = _scale_of(np.max(np.abs(np.concatenate(caps[li][g]))))
            for p in projs:
                got = np.float32(getattr(layer, p).act_scale)
                assert got == want, (li, p, got, want)


def test_smoothed_projections_get_the_scale_of_x_over_s(tiny):
    params, calib, _ = tiny
    qparams = _quantize(tiny, "arhq-smooth")
    caps = _captured(params, calib)
    seen = set()
    for li, layer in enumerate(qparams.layers):
        for g, projs in INPUT_GROUPS.items():
            x = np.concatenate(caps[li][g])
            for p in projs:
                ql = getattr(layer, p)
                recip = np.float32(1.0) / np.asarray(ql.smooth, np.float32)  # fl32(1/s)
                want = _scale_of(np.max(np.abs(x * recip[None, :])))
                assert np.float32(ql.act_scale) == want, (li, p)
                seen.add(float(ql.act_scale))
    assert len(seen) > 4  # per projection, not per group


def test_smoothquant_scale_is_that_of_the_folded_norm_output(tiny):
    params, calib, _ = tiny
    qparams = _quantize(tiny, "smoothquant")
    layer = qparams.layers[0]
    assert not np.array_equal(np.asarray(layer.input_norm), np.asarray(params.layers[0].input_norm))
    # The q/k/v input of the folded layer (its norm output; the projections do not enter it).
    runner = LayerwiseRunner(params, CFG, calib, batch_size=2)
    x = np.concatenate(
        [np.asarray(c["qkv"], np.float32)[np.asarray(m)] for c, m in runner.captures(layer)]
    )
    want = _scale_of(np.max(np.abs(x)))
    unfolded = _scale_of(np.max(np.abs(np.concatenate(_captured(params, calib)[0]["qkv"]))))
    assert want != unfolded
    for p in INPUT_GROUPS["qkv"]:
        assert np.float32(getattr(layer, p).act_scale) == want


def test_serq_scale_is_that_of_the_flattened_input(tiny):
    params, calib, _ = tiny
    qparams = _quantize(tiny, "serq")
    caps = _captured(params, calib)
    for li, layer in enumerate(qparams.layers):
        for g, projs in INPUT_GROUPS.items():
            x = np.concatenate(caps[li][g])
            for p in projs:
                sl = getattr(layer, p)
                xt = (x / np.asarray(sl.s, np.float32))[:, np.asarray(sl.perm)]
                assert np.float32(sl.act_scale) == _scale_of(np.max(np.abs(xt))), (li, p)


def test_dynamic_option_stores_no_scale(tiny):
    qparams = _quantize(tiny, "rtn", act_scale="dynamic")
    assert all(
        getattr(layer, p).act_scale is None for layer in qparams.layers for p in INPUT_GROUPS["qkv"]
    )


# ------------------------------------------------------------------------------ G of ARHQ


def _g_numpy(x: np.ndarray, ts) -> np.ndarray:
    """float64 EᵀE/N, E = x − Q(x) with the numpy NVFP4 fake-quantizer at tensor scale ``ts``."""
    e = x.astype(np.float64) - npq.fake_quant(x, "nvfp4", ts)
    return e.T @ e / len(x)


@pytest.mark.parametrize("setting", ["raw", "smooth"])
def test_arhq_g_uses_the_static_quantizer(tiny, monkeypatch, setting):
    params, calib, _ = tiny
    seen = {}
    split = lowrank.split_weight

    def spy(qcfg, w_t, g, factor_dtype, *rest):
        seen[len(seen)] = None if g is None else np.asarray(g, np.float64)
        return split(qcfg, w_t, g, factor_dtype, *rest)

    monkeypatch.setattr(lowrank, "split_weight", spy)
    qcfg = QuantConfig(method="arhq", rank=4, setting=setting, stats_dtype="float64")
    res = quantize_model(params, CFG, calib, qcfg, batch_size=2, progress=False)
    x_batches = _captured(params, calib)[0]["qkv"]
    x = np.concatenate(x_batches)
    ql = res.params.layers[0].q_proj
    if setting == "smooth":
        recip = np.float32(1.0) / np.asarray(ql.smooth, np.float32)
        x_batches = [b * recip[None, :] for b in x_batches]
        x = x * recip[None, :]
    ts = np.float32(ql.act_scale)
    assert ts == _scale_of(np.max(np.abs(x)))
    want = _g_numpy(x, ts)
    got = seen[0]  # layer 0, q_proj: the first projection split
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 1e-6, err
    # What today's dynamic quantizer gives (scale per calibration batch): clearly different.
    n = len(x)
    dyn = sum(_g_numpy(b, None) * len(b) for b in x_batches) / n
    assert np.max(np.abs(dyn - want)) / np.max(np.abs(want)) > 100 * max(err, 1e-9)


# ------------------------------------------------------------------------------ weight global scale


@pytest.mark.parametrize("name", ["rtn", "gptq"])
def test_fused_partitions_share_one_weight_global_scale(tiny, name):
    params, _, _ = tiny
    qparams = _quantize(tiny, name)
    for fl, ql in zip(params.layers, qparams.layers, strict=True):
        for g, projs in INPUT_GROUPS.items():
            amax = max(
                float(np.max(np.abs(np.asarray(getattr(fl, p).w, np.float32)))) for p in projs
            )
            want = _scale_of(amax)
            for p in projs:
                assert np.float32(getattr(ql, p).w.tensor_scale) == want, (g, p)
        # The packed weight is RTN of W under the joint scale (numpy reference).
        if name == "rtn":
            w = np.asarray(fl.k_proj.w, np.float32)
            ts = np.float32(ql.k_proj.w.tensor_scale)
            deq = np.asarray(formats.dequantize(ql.k_proj.w, jnp.float32), np.float64)
            np.testing.assert_array_equal(deq, npq.fake_quant(w, "nvfp4", ts))
    qkv = [np.float32(getattr(qparams.layers[0], p).w.tensor_scale) for p in INPUT_GROUPS["qkv"]]
    sep = _quantize(tiny, name, fused_w_scale=False)
    own = [np.float32(getattr(sep.layers[0], p).w.tensor_scale) for p in INPUT_GROUPS["qkv"]]
    assert len(set(qkv)) == 1 and len(set(own)) > 1
    for p in INPUT_GROUPS["qkv"]:
        w = np.asarray(getattr(params.layers[0], p).w, np.float32)
        assert np.float32(getattr(sep.layers[0], p).w.tensor_scale) == _scale_of(np.max(np.abs(w)))


@pytest.mark.parametrize("name", ["arhq", "arhq-smooth", "svdquant-gptq", "smoothquant"])
def test_fused_scale_is_shared_by_residual_methods(tiny, name):
    qparams = _quantize(tiny, name)
    for layer in qparams.layers:
        for projs in (INPUT_GROUPS["qkv"], INPUT_GROUPS["gate_up"]):
            scales = {float(getattr(layer, p).w.tensor_scale) for p in projs}
            acts = {float(getattr(layer, p).act_scale) for p in projs}
            assert len(scales) == 1
            if name != "arhq-smooth":  # one input per group; per projection when smoothed
                assert len(acts) == 1


def test_joint_weight_scale_helper():
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((8, 32)).astype(np.float32) * k for k in (1.0, 3.0, 0.5)]
    want = _scale_of(max(np.max(np.abs(w)) for w in ws))
    assert np.float32(global_scales.joint_weight_scale(ws)) == want
    out = global_scales.fused_weight_scales(
        {"q_proj": ws[0], "k_proj": ws[1], "o_proj": ws[2]},
        {"q_proj": "qkv", "k_proj": "qkv", "o_proj": "o"},
        True,
    )
    assert np.float32(out["q_proj"]) == np.float32(out["k_proj"]) == want
    assert np.float32(out["o_proj"]) == _scale_of(np.max(np.abs(ws[2])))
    assert global_scales.fused_weight_scales({"q_proj": ws[0]}, {"q_proj": "qkv"}, False) == {}


def test_smoothed_amax_is_exact():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((500, 48)) * np.exp(rng.standard_normal(48))).astype(np.float32)
    s = np.exp(rng.standard_normal(48)).astype(np.float32)
    want = np.max(np.abs(x * (np.float32(1.0) / s)))
    got = global_scales.smoothed_amax(np.max(np.abs(x), axis=0), s)
    assert np.float32(got) == want
    assert float(global_scales.smoothed_amax(np.abs(x).max(0))) == float(np.abs(x).max())
    lo, hi = x.min(0), x.max(0)
    xt = x / np.asarray(serq.serq_flatten_scale(lo, hi))
    assert np.float32(serq.serq_input_amax(lo, hi)) == np.max(np.abs(xt))


def test_static_alpha_search_uses_the_scale_of_each_alpha():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 40, 32)).astype(np.float32)
    w = rng.standard_normal((24, 32)).astype(np.float32)
    m_x = np.abs(x).reshape(-1, 32).max(0)
    st = decompose.init_alpha_search()
    both = decompose.update_alpha_search(st, x, w, m_x, "nvfp4", "nvfp4", static_act_scale=True)
    parts = st
    for chunk in x:  # static: the error sum does not depend on how tokens are chunked
        parts = decompose.update_alpha_search(
            parts, chunk, w, m_x, "nvfp4", "nvfp4", static_act_scale=True
        )
    np.testing.assert_allclose(both.errors, parts.errors, rtol=1e-5)
    i = 7
    s = decompose.smooth_scales(m_x, decompose.weight_absmax(w), decompose.ALPHAS[i])
    xs = x.reshape(-1, 32) / s
    ts = formats.nvfp4_tensor_scale(m_x / s)
    xq = np.asarray(formats.fake_quant(xs, "nvfp4", tensor_scale=ts), np.float64)
    wq = np.asarray(formats.fake_quant(w * s, "nvfp4"), np.float64)
    y = x.reshape(-1, 32).astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(float(both.errors[i]), np.sum((xq @ wq.T - y) ** 2), rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        decompose.update_alpha_search(
            st, x, w, m_x, "nvfp4", "nvfp4", static_act_scale=True, act_tensor_scale=1.0
        )


# ------------------------------------------------------------------------------ options


def test_defaults_and_resolution():
    q = QuantConfig()
    assert (q.act_scale, q.fused_w_scale, q.static_act_scale) == ("static", True, True)
    assert QuantConfig(act_scale="dynamic").label() == "arhq-r32-raw-nvfp4/nvfp4-dyn"
    for kw in (
        {"method": "gptq"},  # int4 weight-only
        {"method": "smoothquant"},  # int8 W8A8
        {"method": "awq"},
        {"method": "resq"},
        {"method": "serq"},  # mxfp4
        {"method": "rtn", "act_fmt": "int8"},
        {"method": "svdquant", "act_fmt": None},
    ):
        q = QuantConfig(**kw)
        assert q.act_scale is None and not q.static_act_scale, kw
    assert QuantConfig(method="rtn", act_fmt="int8").fused_w_scale  # nvfp4 weights still
    assert not QuantConfig(method="serq", w_fmt="nvfp4", act_fmt="nvfp4").fused_w_scale
    assert QuantConfig(method="serq", w_fmt="nvfp4", act_fmt="nvfp4").act_scale == "static"
    q = QuantConfig(method="rtn", fused_w_scale=False, act_scale="dynamic")
    assert QuantConfig.from_dict(q.to_dict()) == q


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"act_scale": "calibrated"}, "unknown activation scale"),
        ({"method": "rtn", "act_fmt": "int8", "act_scale": "static"}, "nvfp4 activations only"),
        ({"method": "svdquant", "act_fmt": None, "act_scale": "dynamic"}, "weight-only"),
        ({"method": "awq", "act_scale": "static"}, "nvfp4 activations only"),
        ({"method": "gptq", "fused_w_scale": True}, "fused_w_scale applies"),
        ({"method": "rtn", "w_fmt": "mxfp4", "fused_w_scale": True}, "fused_w_scale applies"),
        ({"method": "serq", **W4A4, "fused_w_scale": True}, "fused_w_scale applies"),
        ({"fused_w_scale": "yes"}, "True or False"),
    ],
)
def test_options_where_they_do_not_apply_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_non_nvfp4_activations_are_untouched(tiny):
    params, calib, _ = tiny
    qcfg = QuantConfig(method="rtn", act_fmt="int8")
    res = quantize_model(params, CFG, calib, qcfg, batch_size=2, progress=False)
    assert res.calib_tokens == 0  # data-free as before: no amax pass
    assert all(
        getattr(la, p).act_scale is None for la in res.params.layers for p in INPUT_GROUPS["qkv"]
    )


def test_cli_flags():
    base = ["quantize", "--out", "x"]
    a = build_parser().parse_args(base)
    assert a.act_scale is None and a.fused_w_scale is None
    a = build_parser().parse_args([*base, "--act-scale", "dynamic", "--no-fused-w-scale"])
    assert a.act_scale == "dynamic" and a.fused_w_scale is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--act-scale", "sometimes"])


@pytest.mark.slow
def test_smollm2_logits_are_batch_invariant_with_static_scales(smollm2):
    """SmolLM2 with its first two layers in RTN W4A4: 4 evaluation sequences scored together and
    one by one give the same logits with static scales, and different ones with dynamic scales."""
    from arhq_jax.evaluation import metrics as ev

    cfg, fp = smollm2.cfg, smollm2.params
    calib_part, eval_part = ev.split_tokens(ev.load_text_tokens(smollm2.tokenizer))
    calib = np.asarray(calib_part[:512], np.int32).reshape(2, 256)
    ids = np.asarray(eval_part[: 4 * 256], np.int32).reshape(4, 256)
    two = fp.replace(layers=fp.layers[:2])

    def gap(params):
        together = np.asarray(transformer.forward(params, cfg, ids))
        alone = [np.asarray(transformer.forward(params, cfg, ids[i : i + 1])) for i in range(4)]
        return float(np.max(np.abs(together - np.concatenate(alone))))

    assert gap(fp) == 0.0, "the float forward itself depends on the batch at this shape"
    for act_scale in ("static", "dynamic"):
        qcfg = QuantConfig(method="rtn", act_scale=act_scale)
        q2 = quantize_model(two, cfg.replace(num_layers=2), calib, qcfg, progress=False).params
        g = gap(fp.replace(layers=q2.layers + fp.layers[2:]))
        if act_scale == "static":
            assert g == 0.0, f"static scales: logits move by {g} with the batch"
        else:
            assert g > 1e-3, f"dynamic scales should couple the batch, gap {g}"


def test_advance_reuses_the_last_capture_pass(tiny, monkeypatch):
    """The amax pass costs a layer forward; parallel mode gets one back: ``advance`` through the
    layer just captured reuses that pass's outputs (same bits as running the layer again)."""
    import arhq_jax.calibration.calibrate as cal

    params, calib, _ = tiny
    fresh = LayerwiseRunner(params, CFG, calib, batch_size=2)
    fresh.advance(params.layers[0])
    reused = LayerwiseRunner(params, CFG, calib, batch_size=2)
    for _ in reused.captures(params.layers[0]):
        pass
    calls = []
    layer_fn = cal.layer_pass
    monkeypatch.setattr(cal, "layer_pass", lambda *a: calls.append(1) or layer_fn(*a))
    reused.advance(params.layers[0])
    assert calls == []
    for (a, _), (b, _) in zip(fresh.batches(), reused.batches(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another layer object (e.g. the quantized one in sequential mode) runs again.
    reused.advance(params.layers[1])
    assert len(calls) == len(reused.batches())


def test_second_capture_pass_reads_the_kept_inputs(tiny, monkeypatch):
    """Static scales read a layer's inputs twice (amax, then G): the second pass through the same
    layer object yields the first pass's arrays without a forward; past the byte bound, or for
    another layer object, the layer runs again, and the arrays are the same either way."""
    import arhq_jax.calibration.calibrate as cal

    params, calib, _ = tiny
    layer = params.layers[0]
    calls = []
    layer_fn = cal.layer_pass
    monkeypatch.setattr(cal, "layer_pass", lambda *a: calls.append(1) or layer_fn(*a))
    kept = LayerwiseRunner(params, CFG, calib, batch_size=2)
    rerun = LayerwiseRunner(params, CFG, calib, batch_size=2, capture_cache_bytes=0)
    n = len(kept.batches())
    first = [{k: np.asarray(v) for k, v in c.items()} for c, _ in kept.captures(layer)]
    second = [{k: np.asarray(v) for k, v in c.items()} for c, _ in kept.captures(layer)]
    assert len(calls) == n
    again = [c for c, _ in rerun.captures(layer)] + [c for c, _ in rerun.captures(layer)]
    assert len(calls) == 3 * n
    for a, b, c in zip(first, second, again[n:], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], np.asarray(c[k]))
    kept.advance(layer)  # reuses the outputs, drops the kept inputs
    assert len(calls) == 3 * n
    for _ in kept.captures(params.layers[1]):
        pass
    assert len(calls) == 4 * n


def test_layer_snr_baseline_quantizes_activations_like_the_method(tiny):
    from arhq_jax.evaluation.layer_snr import rtn_baseline

    params, _, _ = tiny
    for name, extra in (("arhq", {}), ("arhq-smooth", {}), ("arhq", {"act_scale": "dynamic"})):
        ql = _quantize(tiny, name, **extra).layers[0].k_proj
        base = rtn_baseline(params.layers[0].k_proj, ql, "nvfp4", "nvfp4")
        if ql.act_scale is None:
            assert base.act_scale is None
        else:
            assert np.float32(base.act_scale) == np.float32(ql.act_scale)
