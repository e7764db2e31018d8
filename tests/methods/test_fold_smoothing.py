"""Folded smoothing (``arhq_jax.methods.fold_smoothing``, ``setting="fold"``).

References: transformers' own forward in float64 of the folded and unfolded weights (the fold is
exact up to rounding); a numpy float64 brute force of the α search's errors over the independent
nvfp4 of ``_fp4_numpy``; the smooth setting (per-projection runtime divisors) with the same
vectors, which with power-of-two vectors must give the folded model's output bit for bit; and
transformers + peft loading the exported checkpoint.
"""

from __future__ import annotations

import json

import _fp4_numpy as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as TM
from _reference import param_tensors
from _tiny import CFG

import arhq_jax.methods.fold_smoothing as fs
from arhq_jax.calibration import calibrate
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.decomposition.decompose import ALPHAS
from arhq_jax.evaluation import metrics as ev
from arhq_jax.linears.quantized import QuantLinear, weights_only
from arhq_jax.models.config import GROUP_OF, INPUT_GROUPS
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

torch = pytest.importorskip("torch")
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _vectors(cfg, rng, pow2=False):
    """Random positive vectors per group; o's tied over the query heads of each KV head."""
    shapes = cfg.linear_shapes()
    out = {}
    for g, ps in INPUT_GROUPS.items():
        n = shapes[ps[0]][1]
        if g == "o":
            n = cfg.num_kv_heads * cfg.head_dim
        v = 2.0 ** rng.integers(-2, 3, n) if pow2 else np.exp(rng.normal(0, 0.7, n))
        if g == "o":
            rep = cfg.num_heads // cfg.num_kv_heads
            v = np.repeat(v.reshape(cfg.num_kv_heads, 1, cfg.head_dim), rep, 1).reshape(-1)
        out[g] = v
    return out


@pytest.mark.parametrize("name", ["qwen3", "llama3", "llama_bias"])
def test_folded_model_equals_the_float_model_in_float64(name):
    """transformers in f64: the folded weights give the unfolded model's logits to ~1e-13."""
    cfg, params = TM.jax_model(name)
    rng = np.random.default_rng(7)
    hf = TM.hf_model(name)
    ref_sd = {k: v.clone() for k, v in hf.state_dict().items()}
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        layers = tuple(fs.fold_layer(lay, cfg, _vectors(cfg, rng)) for lay in p64.layers)
        folded = p64.replace(layers=layers)
        tensors = param_tensors(folded)
        biases = {}
        for i, lay in enumerate(folded.layers):
            for p in ("v_proj", "up_proj"):
                b = getattr(lay, p).b
                if b is not None:
                    mod = "self_attn" if p == "v_proj" else "mlp"
                    biases[f"model.layers.{i}.{mod}.{p}.bias"] = np.asarray(b)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    m = TM.hf_model(name).double()
    try:
        with TM.one_thread():
            want = m(torch.as_tensor(ids)).logits.numpy()
            sd = {k: v.clone() for k, v in m.state_dict().items()}
            changed = 0
            for k, v in {**tensors, **biases}.items():
                if k in sd and not np.array_equal(sd[k].numpy(), v):
                    sd[k] = torch.from_numpy(np.asarray(v, np.float64))
                    changed += 1
            m.load_state_dict(sd)
            got = m(torch.as_tensor(ids)).logits.numpy()
    finally:  # the cached model back to its f32 weights
        hf.load_state_dict(ref_sd)
        hf.float()
    # norms, q/k/v/o, gate/up/down of every layer changed (and the v/up biases, if any)
    assert changed == cfg.num_layers * (9 + 2 * bool(biases))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-12, err
    # the folded weights are really different: the check is not vacuous
    assert (
        np.abs(
            tensors["model.layers.0.input_layernorm.weight"]
            - np.asarray(params.layers[0].input_norm, np.float64)
        ).max()
        > 0.1
    )


def test_an_untied_o_vector_is_refused():
    cfg, params = TM.jax_model("llama3")
    v = _vectors(cfg, np.random.default_rng(1))
    v["o"] = v["o"].copy()
    v["o"][0] *= 1.5  # head 0 differs from head 1, which shares its KV head
    with pytest.raises(ValueError, match="share a KV head"):
        fs.fold_layer(params.layers[0], cfg, {"o": v["o"]})
    with pytest.raises(ValueError, match="finite and positive"):
        fs.fold_layer(params.layers[0], cfg, {"qkv": -np.ones(cfg.hidden_size)})
    with pytest.raises(ValueError, match=r"group down must be \[128\]"):
        fs.fold_layer(params.layers[0], cfg, {"down": np.ones(cfg.hidden_size)})
    with pytest.raises(ValueError, match="unknown input group 'up'"):
        fs.fold_layer(params.layers[0], cfg, {"up": np.ones(cfg.hidden_size)})


def test_dead_channels_get_a_bounded_vector():
    """m_x = 0 (a dead input channel) or m_w = 0 would give s → 0 or ∞ and γ / s out of the
    checkpoint's range: s is clamped to [S_MIN, S_MAX]."""
    m_x = np.array([0.0, 1.0, 1e9, 2.0], np.float32)
    m_w = np.array([1.0, 0.0, 1.0, 0.5], np.float32)
    s = np.asarray(fs.scales(m_x, m_w, np.asarray(ALPHAS, np.float32)))
    assert s.shape == (21, 4) and np.isfinite(s).all()
    assert s.min() >= fs.S_MIN and s.max() <= fs.S_MAX
    assert s[20, 0] == np.float32(fs.S_MIN) and s[0, 1] == np.float32(fs.S_MAX)
    np.testing.assert_allclose(s[10, 3], 2.0**0.5 / 0.5**0.5, rtol=1e-6)


def test_o_candidates_are_tied_and_folding_them_is_exact(model):
    params, _ = model
    layer = params.layers[0]
    m_x = jnp.asarray(np.random.default_rng(2).uniform(0.1, 3.0, CFG.num_heads * CFG.head_dim))
    cand = np.asarray(fs.candidate_scales(layer, CFG, "o", m_x))
    per = cand.reshape(len(ALPHAS), CFG.num_kv_heads, -1, CFG.head_dim)
    assert (per == per[:, :, :1]).all()
    assert np.ptp(cand[10]) > 0  # not constant: the tie is per KV head only
    fs.fold_layer(layer, CFG, {"o": cand[10]})  # accepted


def _np_group_errors(x, w, cand, m_x):
    """Σ_t ‖Q_a(x/s) Q_w(W s)ᵀ − x Wᵀ‖² per candidate, numpy: the independent nvfp4 of
    _fp4_numpy (static activation scale from max m_x/s), products in float64."""
    y = x.astype(np.float64) @ w.astype(np.float64).T
    out = []
    for s in cand:
        s = s.astype(np.float32)
        amax = np.float32(np.max(m_x / s))
        ts = np.float32(2688.0) * (np.float32(1.0) / amax)
        xq = F.fake_quant((x / s).astype(np.float32), "nvfp4", tensor_scale=ts)
        wq = F.fake_quant((w * s).astype(np.float32), "nvfp4")
        out.append(np.sum(np.square(xq.astype(np.float64) @ wq.astype(np.float64).T - y)))
    return np.asarray(out)


@pytest.mark.parametrize("group", ["qkv", "o"])
def test_alpha_search_errors_match_a_numpy_brute_force(model, group):
    params, ids = model
    layer = params.layers[0]
    runner = calibrate.LayerwiseRunner(params, CFG, ids, batch_size=3)
    xs = [(np.asarray(c[group], np.float32), np.asarray(m)) for c, m in runner.captures(layer)]
    x = np.concatenate([a[m] for a, m in xs])
    m_x = np.abs(x).max(0)
    cand = np.asarray(fs.candidate_scales(layer, CFG, group, m_x))
    w = np.asarray(fs.group_weight(layer, group), np.float32)
    st = fs.init_search()
    for a, m in xs:  # two chunks with their masks, as the runner streams them
        st = fs.update_search(st, a, w, cand, m_x, "nvfp4", "nvfp4", mask=m, static_act_scale=True)
    got = np.asarray(st.errors, np.float64)
    want = _np_group_errors(x, w, cand, m_x)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert int(np.argmin(got)) == int(np.argmin(want))
    assert int(st.count) == len(x)


@pytest.mark.parametrize("producers", ["unit", "pow2"])
def test_fold_equals_per_projection_smoothing_where_the_vectors_agree(
    model, monkeypatch, producers
):
    """Power-of-two vectors (exact division and scaling) shared per group: the folded model and
    the smooth setting's runtime divisors quantize every consumer the same, bit for bit (ARHQ
    r4, GPTQ residual, W4A4). Folding o's and down's vectors also rescales v's and up's rows,
    which the smooth setting leaves alone: with those vectors at 1 (``unit``) the two quantized
    models are identical, logits included; with power-of-two vectors there too (``pow2``, per-
    projection weight global scales) q, k, o, gate and down still get the same codes."""
    params, ids = model
    vec = _vectors(CFG, np.random.default_rng(3), pow2=True)
    if producers == "unit":
        vec["o"], vec["down"] = np.ones_like(vec["o"]), np.ones_like(vec["down"])
    vec = {g: jnp.asarray(v, jnp.float32) for g, v in vec.items()}

    def fixed_alpha_search(self, layer, projs, m_x, qcfg):
        return {p: (0.5, vec[GROUP_OF[p]]) for p in projs}

    def fixed_search(calib, layer, groups, qcfg):
        return {g: (0.5, vec[g]) for g in groups}

    monkeypatch.setattr(calibrate.Calibration, "alpha_search", fixed_alpha_search)
    monkeypatch.setattr(fs, "search", fixed_search)
    kw = dict(method="arhq", rank=4, residual_quant="gptq", fused_w_scale=producers == "unit")
    qs = quantize_model(params, CFG, ids, QuantConfig(setting="smooth", **kw), progress=False)
    qf = quantize_model(params, CFG, ids, QuantConfig(setting="fold", **kw), progress=False)
    same = (
        PROJS if producers == "unit" else ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
    )
    for ls, lf in zip(qs.params.layers, qf.params.layers, strict=True):
        for p in PROJS:
            a, b = getattr(ls, p), getattr(lf, p)
            assert a.smooth is not None and b.smooth is None
            if p not in same:
                continue
            np.testing.assert_array_equal(np.asarray(a.w.codes), np.asarray(b.w.codes), err_msg=p)
            np.testing.assert_array_equal(np.asarray(a.w.scales), np.asarray(b.w.scales))
            np.testing.assert_array_equal(np.asarray(a.act_scale), np.asarray(b.act_scale))
            np.testing.assert_array_equal(np.asarray(a.a), np.asarray(b.a))
    x = jnp.asarray(ids[:2])
    fwd = ev.jitted_forward()
    ys, yf = np.asarray(fwd(qs.params, CFG, x)), np.asarray(fwd(qf.params, CFG, x))
    ref = np.asarray(fwd(params, CFG, x))
    assert np.abs(yf - ref).max() > 1e-3  # quantized: the comparison is not of two float models
    if producers == "unit":
        np.testing.assert_array_equal(ys, yf)


def test_fold_recipe_runs_with_refinement_and_records_alpha(model):
    params, ids = model
    qcfg = QuantConfig(
        method="arhq", rank=4, setting="fold", residual_quant="gptq", mse_clip=True,
        refine_iters=2, sequential=True,
    )  # fmt: skip
    assert qcfg.label().endswith("-fold-nvfp4/nvfp4")
    res = quantize_model(params, CFG, ids, qcfg, progress=False)
    assert len(res.projections) == 7 * CFG.num_layers
    for d in res.projections:
        assert d["alpha"] in ALPHAS
        assert d["refine_objectives"] == sorted(d["refine_objectives"], reverse=True)
    lay = res.params.layers[0]
    assert all(isinstance(getattr(lay, p), QuantLinear) and getattr(lay, p).smooth is None
               for p in INPUT_GROUPS["qkv"])  # fmt: skip
    assert np.abs(np.asarray(lay.input_norm) - np.asarray(params.layers[0].input_norm)).max() > 0
    ref = np.asarray(ev.jitted_forward()(params, CFG, jnp.asarray(ids[:2])))
    out = np.asarray(ev.jitted_forward()(res.params, CFG, jnp.asarray(ids[:2])))
    assert np.isfinite(out).all() and np.abs(out - ref).max() / np.abs(ref).max() < 0.5


def test_the_folded_export_loads_in_transformers_and_peft(model, tmp_path, monkeypatch):
    """compressed-tensors NVFP4 + lora/, with the folded norms: transformers + peft give
    arhq-jax's weight-only logits (f32 decompression: to 2e-5)."""
    from compressed_tensors.compressors.nvfp4 import base as ct_base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    params, ids = model
    qcfg = QuantConfig(method="arhq", rank=4, setting="fold", factor_dtype="bfloat16")
    q = quantize_model(params, CFG, ids, qcfg, progress=False).params
    out = tmp_path / "fold"
    checkpoint.save(out, q, CFG, quant=qcfg.to_dict())
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["format"] == "nvfp4-pack-quantized"
    kinds = {e["kind"] for e in hf["arhq_jax"]["modules"].values()}
    assert kinds == {"ct-nvfp4"}
    loaded, _, _ = checkpoint.load(out)
    np.testing.assert_array_equal(
        np.asarray(loaded.layers[1].post_norm), np.asarray(q.layers[1].post_norm)
    )
    x = ids[:2]
    ours = np.asarray(ev.jitted_forward()(weights_only(q), CFG, jnp.asarray(x)))
    unpack = ct_base.unpack_fp4_from_uint8
    monkeypatch.setattr(
        ct_base, "unpack_fp4_from_uint8", lambda *a, **k: unpack(*a, dtype=torch.float32)
    )
    m = AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=CompressedTensorsConfig(run_compressed=False),
        dtype=torch.float32,
    )  # fmt: skip
    monkeypatch.undo()
    m = PeftModel.from_pretrained(m, str(out / "lora")).eval()
    with torch.no_grad():
        theirs = m(torch.from_numpy(np.asarray(x, np.int64))).logits.numpy()
    err = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert err < 2e-5, err


def test_streamed_fold_checkpoint_equals_in_memory(tmp_path):
    """The streaming writer takes the folded norms and producers: the same files as
    ``save(quantize_model(...))``, and the norms in them are the folded ones."""
    from arhq_jax.models.params import random_params
    from arhq_jax.run import stream
    from converters import load_model, save_hf_dir
    from converters.lazy import open_source
    from converters.safetensors_io import SafetensorsReader

    bf = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    src = save_hf_dir(bf, random_params(bf, jax.random.key(3), std=0.08), tmp_path / "src")
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)
    qcfg = QuantConfig(method="arhq", rank=4, setting="fold", sequential=True)
    m = load_model(src, tokenizer=False)
    res = quantize_model(m.params, m.cfg, ids, qcfg, batch_size=4, progress=False)
    checkpoint.save(tmp_path / "mem", res.params, m.cfg, quant={"note": "t"}, source={"model": "t"})
    with open_source(src) as s:
        stream.quantize_stream(
            s, ids, qcfg, tmp_path / "str", quant={"note": "t"}, source={"model": "t"},
            batch_size=4, progress=False,
        )  # fmt: skip
    for name in ("model.safetensors", "lora/adapter_model.safetensors"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "str" / name).read_bytes()
    key = "model.layers.1.input_layernorm.weight"
    with SafetensorsReader([tmp_path / "str" / "model.safetensors"]) as r:
        norm = np.asarray(r.get(key), np.float32)
    orig = np.asarray(m.params.layers[1].input_norm, np.float32)
    assert np.abs(norm - orig).max() > 1e-3
    np.testing.assert_array_equal(norm, np.asarray(res.params.layers[1].input_norm, np.float32))
