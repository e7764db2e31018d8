"""The checkpoint's storage dtype: the source's dtype as stored (``source_storage``), the float
parameters rounded to it by the writer (round to nearest even, ml_dtypes' cast as the reference),
the factors by the method, both paths (in memory and streamed) writing the same bytes, and the
loader returning what is stored."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _tiny_cli import config, params, write_gguf

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.checkpoint.schema import cast_param
from arhq_jax.linears.base import Dense
from arhq_jax.models.params import params_to_tensors
from arhq_jax.run.config import QuantConfig, preset
from arhq_jax.run.quantize import quantize_model
from arhq_jax.run.stream import quantize_stream
from converters import load_model, save_hf_dir
from converters.lazy import open_source
from converters.safetensors_io import SafetensorsReader, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bf16_dir(path):
    cfg = config().replace(param_dtype="bfloat16", dtype="bfloat16")
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params(config()))
    return save_hf_dir(cfg, p, path)


def test_source_storage_of_each_source_kind(tmp_path):
    src = _bf16_dir(tmp_path / "bf16")
    with SafetensorsReader([src / "model.safetensors"]) as r:
        want = sum(r.info(n).end - r.info(n).begin for n in r.names())
    s = checkpoint.source_storage(src)
    assert (s.dtype, s.nbytes, s.what) == ("bfloat16", want, "safetensors BF16")
    # F32 norms beside BF16 weights: the dtype of most parameters wins.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text((src / "config.json").read_text())
    tensors = {
        n: np.asarray(x, np.float32 if "norm" in n else BF16)
        for n, x in params_to_tensors(config(), params(config()))
    }
    write_safetensors(mixed / "model.safetensors", tensors.items())
    s = checkpoint.source_storage(mixed)
    assert s.dtype == "bfloat16" and s.what == "safetensors BF16, F32"
    g = checkpoint.source_storage(write_gguf(tmp_path / "t.gguf"))
    assert g.dtype == "float32" and g.what == "GGUF F32"
    c = config("qwen3")
    n = sum(x.size for name, x in params_to_tensors(c, params(c)) if name != "lm_head.weight")
    assert g.nbytes == 4 * n  # all F32, the tied head not stored


def test_smollm2_gguf_is_float32_and_sized_as_stored():
    from converters import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    s = checkpoint.source_storage("smollm2")
    assert s.dtype == "float32" and s.what == "GGUF Q4_1, Q8_0, F32"
    assert 0.95 * path.stat().st_size < s.nbytes < path.stat().st_size


def test_cast_param_rounds_to_nearest_even_and_names_an_overflow():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 7
    np.testing.assert_array_equal(
        cast_param(x, "bfloat16", "t").view(np.uint16), x.astype(BF16).view(np.uint16)
    )
    assert cast_param(x, None, "t") is not None and cast_param(x, None, "t").dtype == np.float32
    codes = np.arange(8, dtype=np.uint8)
    assert cast_param(codes, "bfloat16", "t").dtype == np.uint8  # only floats are cast
    with pytest.raises(ValueError, match=r"model.norm.weight: 1 values overflow float16"):
        cast_param(np.array([1.0, 7e4], np.float32), "float16", "model.norm.weight")


def test_with_factor_dtype():
    assert checkpoint.with_factor_dtype(QuantConfig(method="arhq"), "bfloat16").factor_dtype == (
        "bfloat16"
    )
    assert checkpoint.with_factor_dtype(QuantConfig(method="arhq"), "float32").factor_dtype is None
    rtn = QuantConfig(method="rtn")
    assert checkpoint.with_factor_dtype(rtn, "bfloat16") is rtn
    best = preset("best-w4a4")
    assert checkpoint.with_factor_dtype(best, "float16").factor_dtype == "bfloat16"
    own = QuantConfig(method="svdquant", factor_dtype="float32")
    assert checkpoint.with_factor_dtype(own, "bfloat16").factor_dtype == "float32"


def test_saved_in_bf16_loads_as_stored(tmp_path):
    """``save(dtype="bfloat16")`` of an f32 model with a dense lm_head: embedding, norms and
    lm_head rounded (RNE), declared bf16; ``load`` returns those bf16 arrays as stored."""
    cfg = config().replace(tie_word_embeddings=False)
    p = params(cfg)
    assert isinstance(p.lm_head, Dense)
    out = tmp_path / "ck"
    checkpoint.save(out, p, cfg, dtype="bfloat16")
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == "bfloat16" and hf["arhq_jax"]["param_dtype"] == "bfloat16"
    assert hf["arhq_jax"]["dtype"] == "float32"
    assert hf["arhq_jax"]["modules"]["lm_head"] == {"kind": "dense", "dtype": "bfloat16"}
    q, qcfg, _ = checkpoint.load(out)
    assert qcfg.param_dtype == "bfloat16"
    for got, ref in ((q.embed, p.embed), (q.layers[1].post_norm, p.layers[1].post_norm),
                     (q.lm_head.w, p.lm_head.w)):  # fmt: skip
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(ref).astype(BF16).view(np.uint16)
        )
    # float16 storage: declared and read back as float16 (computed in f32).
    checkpoint.save(tmp_path / "f16", p, cfg, dtype="float16")
    q16, cfg16, _ = checkpoint.load(tmp_path / "f16")
    assert cfg16.param_dtype == "float16" and q16.embed.dtype == jnp.float16


def _digests(d):
    return {
        str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(d.rglob("*"))
        if f.is_file()
    }


def test_streamed_bf16_checkpoint_equals_the_in_memory_one(tmp_path):
    """A bf16 source quantized disk to disk and in memory (SVDQuant r4 weight-only, factors in
    bf16 by ``with_factor_dtype``) gives the same files, byte for byte, with bf16 parameters."""
    src = _bf16_dir(tmp_path / "src")
    storage = checkpoint.source_storage(src)
    qcfg = checkpoint.with_factor_dtype(
        QuantConfig(method="svdquant", rank=4, act_fmt=None), storage.dtype
    )
    with open_source(src) as s:
        quantize_stream(s, None, qcfg, tmp_path / "a", progress=False, dtype=storage.dtype)
    m = load_model(str(src), tokenizer=False)
    r = quantize_model(m.params, m.cfg, None, qcfg, progress=False)
    source = {"fingerprint": checkpoint.fingerprint(m.cfg, m.params)}
    quant = {"calib_tokens": 0, "timings": r.timings}
    checkpoint.save(
        tmp_path / "b", r.params, m.cfg, dtype=storage.dtype, source=source, quant=quant
    )
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert a["arhq_jax"]["modules"] == b["arhq_jax"]["modules"]
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    for f in ("model.safetensors", "lora/adapter_model.safetensors"):
        assert da[f] == db[f], f
    with SafetensorsReader([tmp_path / "a" / "lora" / "adapter_model.safetensors"]) as lr:
        assert {lr.get(n).dtype for n in lr.names()} == {BF16}
