"""The PTQ pipeline on a tiny random Llama: calibration, methods, checkpoints, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.calibration.calibrate import LayerwiseRunner, accumulate
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.checkpoint import writer as checkpoint_writer
from arhq_jax.evaluation.pipeline import calibration_ids, evaluate_models
from arhq_jax.linears.base import Dense
from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.methods.lowrank import stats_config
from arhq_jax.models import transformer
from arhq_jax.models.config import INPUT_GROUPS, PROJECTIONS
from arhq_jax.numerics.formats import dequantize, fake_quant, nvfp4_tensor_scale
from arhq_jax.run.config import QuantConfig, takes
from arhq_jax.run.quantize import quantize_model


def test_calibration_g_matches_direct_computation(model):
    """Streamed G of the q/k/v input equals numpy f64 EᵀE/N over the same captured inputs."""
    params, ids = model
    runner = LayerwiseRunner(params, CFG, ids, batch_size=2)
    qcfg = QuantConfig(method="arhq", act_fmt="nvfp4")
    got = accumulate(runner, params.layers[0], {"qkv": stats_config(qcfg, g=True, absmax=True)})
    # Independent: one forward of the embedding + layer 0 over each batch of 2 sequences.
    ete, n, amax = np.zeros((64, 64)), 0, np.zeros(64)
    for b in range(0, 6, 2):
        h = transformer.embed(params, CFG, jnp.asarray(ids[b : b + 2]))
        pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
        _, _, cap = transformer.layer_forward(params.layers[0], CFG, h, pos, capture=True)
        x = np.asarray(cap["qkv"], np.float64).reshape(-1, 64)
        e = x - np.asarray(fake_quant(cap["qkv"], "nvfp4"), np.float64).reshape(-1, 64)
        ete += e.T @ e
        n += x.shape[0]
        amax = np.maximum(amax, np.abs(x).max(0))
    np.testing.assert_allclose(np.asarray(got["qkv"]["G"]), ete / n, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(got["qkv"]["absmax"]), amax, rtol=1e-6)
    assert got["qkv"]["count"] == ids.size


@pytest.mark.parametrize("method", ["rtn", "svdquant", "arhq"])
@pytest.mark.parametrize("setting", ["raw", "smooth"])
def test_quantize_model_reconstructs_weights(model, method, setting):
    """Every projection becomes a QuantLinear with W·s = residual + B Aᵀ, and the model runs."""
    params, ids = model
    qcfg = QuantConfig(
        method=method, setting=setting, w_fmt="nvfp4", act_fmt="nvfp4", **takes(method, rank=8)
    )
    res = quantize_model(params, CFG, ids, qcfg, progress=False)
    for fp_layer, q_layer in zip(params.layers, res.params.layers, strict=True):
        resids = {}
        for p in PROJECTIONS:
            ql = getattr(q_layer, p)
            assert isinstance(ql, QuantLinear)
            w = np.asarray(getattr(fp_layer, p).w, np.float64)
            s = np.ones(w.shape[1]) if ql.smooth is None else np.asarray(ql.smooth, np.float64)
            assert (ql.smooth is None) == (setting == "raw")
            branch = 0.0 if ql.a is None else np.asarray(ql.b, np.float64) @ np.asarray(ql.a).T
            assert (ql.a is None) == (method == "rtn")
            # The packed residual is the RTN of W·s − B Aᵀ: compare before packing via fake_quant.
            resid = w * s[None, :] - branch
            resids[p] = resid
            # Under the weight global scale the fused partitions share (checked below).
            ts = ql.w.tensor_scale
            deq = np.asarray(dequantize(ql.w, jnp.float32), np.float64)
            ref = fake_quant(jnp.asarray(resid, jnp.float32), "nvfp4", tensor_scale=ts)
            np.testing.assert_allclose(deq, np.asarray(ref), rtol=0, atol=1e-5 * np.abs(w).max())
        for group, projs in INPUT_GROUPS.items():
            amax = max(np.abs(resids[p]).max() for p in projs)
            want = float(nvfp4_tensor_scale(jnp.float32(amax)))
            for p in projs:
                got = float(getattr(q_layer, p).w.tensor_scale)
                np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{group} {p}")
            assert len({float(getattr(q_layer, p).w.tensor_scale) for p in projs}) == 1
    logits = transformer.forward(res.params, CFG, jnp.asarray(ids[:2]))
    assert np.isfinite(np.asarray(logits)).all()
    # Static nvfp4 activation scales are calibrated: every method reads the data now.
    assert res.calib_tokens == ids.size
    # Raw RTN and SVDQuant with dynamic scales need no data: no calibration forward at all.
    dyn = QuantConfig(method=method, setting=setting, act_scale="dynamic", **takes(method, rank=8))
    needs_data = method == "arhq" or setting == "smooth"
    res = quantize_model(params, CFG, ids, dyn, progress=False)
    assert res.calib_tokens == (ids.size if needs_data else 0)


def test_sequential_first_layer_equals_parallel(model):
    params, ids = model
    kw = dict(method="arhq", rank=4, w_fmt="nvfp4", act_fmt="nvfp4")
    par = quantize_model(params, CFG, ids, QuantConfig(**kw), progress=False).params
    seq = quantize_model(params, CFG, ids, QuantConfig(sequential=True, **kw), progress=False)
    seq = seq.params
    # Layer 0's q/k/v see the same inputs either way; later groups see quantized predecessors.
    for p in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(
            np.asarray(getattr(par.layers[0], p).w.codes),
            np.asarray(getattr(seq.layers[0], p).w.codes),
        )
    a_par = np.asarray(par.layers[1].down_proj.a)
    a_seq = np.asarray(seq.layers[1].down_proj.a)
    assert not np.allclose(a_par, a_seq)


def test_modules_attn_leaves_ffn_float(model):
    params, ids = model
    res = quantize_model(
        params, CFG, ids, QuantConfig(method="svdquant", modules="attn", rank=4), progress=False
    )
    layer = res.params.layers[0]
    assert isinstance(layer.o_proj, QuantLinear)
    assert isinstance(layer.gate_proj, Dense) and isinstance(layer.down_proj, Dense)


def test_bad_input_errors(model):
    params, ids = model
    with pytest.raises(ValueError, match="unknown method 'gptqq'"):
        QuantConfig(method="gptqq")
    with pytest.raises(ValueError, match="unknown weight format 'fp3'"):
        QuantConfig(w_fmt="fp3")
    with pytest.raises(ValueError, match="rank 65 is too large for q_proj"):
        QuantConfig(rank=65).check_model(CFG)
    with pytest.raises(ValueError, match="arhq needs an activation format"):
        QuantConfig(method="arhq", act_fmt=None)
    with pytest.raises(ValueError, match="calibration text is too short: it has 100 tokens"):
        calibration_ids(np.arange(100), 1024, 512)


def test_checkpoint_roundtrip_gives_identical_logits(model, tmp_path):
    params, ids = model
    res = quantize_model(params, CFG, ids, QuantConfig(method="arhq", rank=8), progress=False)
    out = tmp_path / "ckpt"
    nbytes = checkpoint.save(out, res.params, CFG, quant={"method": "arhq"})
    loaded, cfg, quant = checkpoint.load(out, expect_config=CFG)
    assert cfg == CFG and quant == {"method": "arhq"}
    assert nbytes == checkpoint.tree_nbytes(res.params) < checkpoint.tree_nbytes(params)
    x = jnp.asarray(ids[:2])
    np.testing.assert_array_equal(
        np.asarray(transformer.forward(loaded, CFG, x)),
        np.asarray(transformer.forward(res.params, CFG, x)),
    )
    # Another model, another format version, a missing file: clear errors.
    with pytest.raises(ValueError, match="made from another model"):
        checkpoint.load(out, expect_config=CFG.replace(num_layers=3))
    meta = json.loads((out / "config.json").read_text())
    meta["arhq_jax"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.json: .* bytes, the manifest says"):
        checkpoint.load(out)  # the manifest catches the edit first
    checkpoint.out_dir.write_manifest(out, checkpoint.FORMAT, checkpoint.FORMAT_VERSION)
    with pytest.raises(ValueError, match="format version 99"):
        checkpoint.load(out)
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint.load(tmp_path / "nowhere")


def test_interrupted_save_leaves_nothing(model, tmp_path, monkeypatch):
    params, _ = model

    def boom(*a, **k):
        raise KeyboardInterrupt

    # Interrupted late: the shards are closed, the adapter is being written.
    monkeypatch.setattr(checkpoint_writer.AdapterWriter, "close", boom)
    res = quantize_model(params, CFG, model[1], QuantConfig(method="arhq", rank=4), progress=False)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "ckpt", res.params, CFG)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_models_matches_direct_perplexity(model):
    params, ids = model
    q = quantize_model(params, CFG, ids, QuantConfig(method="rtn"), progress=False).params
    tokens = ids.reshape(-1)
    res = evaluate_models(
        {"rtn": q}, params, CFG, tokens, seq_len=32, max_chunks=None, progress=False
    )

    # numpy f64 reference on the same chunks, in the same batches of 2: the dynamic NVFP4
    # activation tensor scale is taken over the whole array passed, which couples a batch.
    def nll_and_logp(p):
        lg = np.concatenate(
            [
                np.asarray(transformer.forward(p, CFG, jnp.asarray(ids[i : i + 2])))
                for i in (0, 2, 4)
            ]
        ).astype(np.float64)[:, :-1]
        lg = lg - lg.max(-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
        return nll, logp

    nll_f, lp = nll_and_logp(params)
    nll_q, lq = nll_and_logp(q)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
    assert res["float"]["ppl"] == pytest.approx(np.exp(nll_f), rel=1e-5)
    assert res["rtn"]["ppl"] == pytest.approx(np.exp(nll_q), rel=1e-5)
    assert res["rtn"]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert res["rtn"]["top1"] == pytest.approx(top1)
    assert res["float"]["kl"] == pytest.approx(0.0, abs=1e-6)


SHARDED = textwrap.dedent(
    """
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from arhq_jax.calibration.calibrate import LayerwiseRunner, data_mesh
    from arhq_jax.evaluation.pipeline import evaluate_models
    from arhq_jax.run.config import QuantConfig, takes
    from arhq_jax.calibration.calibrate import accumulate
    from arhq_jax.methods.lowrank import stats_config
    from arhq_jax.run.quantize import quantize_model
    from arhq_jax.models.params import random_params
    sys.path.insert(0, "tests")
    from _tiny import CFG
    assert len(jax.devices()) == 4
    params = random_params(CFG, jax.random.key(0), std=0.08)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)
    qcfg = QuantConfig(method="arhq", rank=8)
    # One quantized model, evaluated on both meshes (rounding flips of a re-quantization would
    # otherwise dominate the comparison).
    q = quantize_model(params, CFG, ids, qcfg, batch_size=6, mesh=data_mesh(jax.devices()[:1]),
                       progress=False).params
    out = {}
    for name, mesh in (("one", data_mesh(jax.devices()[:1])), ("four", data_mesh())):
        runner = LayerwiseRunner(params, CFG, ids, batch_size=6, mesh=mesh)
        runner.advance(params.layers[0])
        g = accumulate(runner, params.layers[1], {"down": stats_config(qcfg, g=True, absmax=True)})
        r = evaluate_models({"arhq": q}, params, CFG, ids.reshape(-1), seq_len=32,
                            max_chunks=None, batch_size=4, mesh=mesh, progress=False)
        out[name] = {"g": np.asarray(g["down"]["G"]).tolist(), "n": g["down"]["count"],
                     "ppl": r["arhq"]["ppl"], "kl": r["arhq"]["kl"], "top1": r["arhq"]["top1"],
                     "devices": len(r and mesh.devices.flat)}
    print(json.dumps(out))
    """
)


def test_sharded_over_four_devices_matches_one():
    """Calibration statistics and evaluation on a 4-device mesh equal the 1-device results."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, cwd=root, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["four"]["devices"] == 4 and out["one"]["devices"] == 1
    assert out["four"]["n"] == out["one"]["n"] == 6 * 32
    np.testing.assert_allclose(out["four"]["g"], out["one"]["g"], rtol=1e-5, atol=1e-9)
    assert out["four"]["ppl"] == pytest.approx(out["one"]["ppl"], rel=1e-6)
    assert out["four"]["kl"] == pytest.approx(out["one"]["kl"], rel=1e-4, abs=1e-8)
    assert out["four"]["top1"] == out["one"]["top1"]


def test_float64_statistics_agree_with_float32(model):
    params, ids = model
    kw = dict(method="arhq", rank=8, modules="ffn")
    r32 = quantize_model(params, CFG, ids, QuantConfig(**kw), progress=False).params
    r64 = quantize_model(params, CFG, ids, QuantConfig(stats_dtype="float64", **kw), progress=False)
    up32, up64 = r32.layers[1].up_proj, r64.params.layers[1].up_proj
    assert up64.a.dtype == jnp.float32  # factors are stored in the model dtype either way
    l32 = np.asarray(up32.b) @ np.asarray(up32.a).T
    l64 = np.asarray(up64.b) @ np.asarray(up64.a).T
    np.testing.assert_allclose(l64, l32, atol=1e-4 * np.abs(l32).max())
