"""Pre-flight: the model's config read without its tensors (the GGUF header against the gguf
library's own parser), the parameter count against the arrays, the estimate's formula, and the
layer progress whose ETA leaves the compiling first layer out."""

from __future__ import annotations

import dataclasses

import _tiny_cli as T
import jax
import numpy as np
import pytest

from arhq_jax.models.params import random_params
from arhq_jax.run import preflight
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.progress import LayerProgress, eta_seconds
from converters.gguf import gguf_tensors


def test_peek_hf_dir_and_gguf_match_the_loaders(tmp_path):
    hf = T.write_hf_dir(tmp_path / "hf", with_tokenizer=False)
    assert preflight.peek_config(hf) == T.config()
    g = T.write_gguf(tmp_path / "m.gguf")
    want = gguf_tensors(g)[0]  # the gguf library's GGUFReader
    assert preflight.peek_config(g) == want
    assert want.family == "qwen3"
    raw = g.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:200])
    with pytest.raises(ValueError, match=r"cut.gguf: not a readable GGUF file"):
        preflight.peek_config(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + raw[4:])
    with pytest.raises(ValueError, match="bad magic"):
        preflight.peek_config(tmp_path / "bad.gguf")
    with pytest.raises(FileNotFoundError):
        preflight.peek_config(tmp_path / "missing.gguf")


def test_count_params_equals_the_arrays():
    untied = dataclasses.replace(T.config(), tie_word_embeddings=False)
    for cfg in (T.config(), T.config("qwen3"), untied):
        params = random_params(cfg, jax.random.key(0))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        total, linear = preflight.count_params(cfg)
        assert total == n, cfg
        want = sum(
            int(np.prod(getattr(layer, p).w.shape))
            for layer in params.layers
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
        assert linear == want


def test_estimate_formula():
    cfg = T.config()  # hidden 64, intermediate 128, 4 heads of 16, 2 layers
    shapes = cfg.linear_shapes()
    per_layer = sum(n * k for n, k in shapes.values())
    attn = 4 * 512 * 64
    kw = dict(batch_size=8, rate=1e11, platform="cpu")
    arhq = preflight.estimate(cfg, QuantConfig(method="arhq", rank=8), 4096, 512, **kw)
    assert arhq.calib_flops == 2 * 2 * (2 * per_layer + attn) * 4096
    # per input group one eigh 4K³ (K = 64 for qkv, o, gate/up; 128 for down), per linear
    # 4·N·K·min(N, K)
    eigh = 3 * 4 * 64**3 + 4 * 128**3
    svd = sum(4 * n * k * min(n, k) for n, k in shapes.values())
    assert arhq.decomp_flops == 2 * (eigh + svd)
    assert arhq.seconds == pytest.approx(
        arhq.calib_flops / (0.5 * 1e11) + arhq.decomp_flops / (0.25 * 1e11)
    )
    rtn = preflight.estimate(cfg, QuantConfig(method="rtn", act_fmt=None), 4096, 512, **kw)
    assert rtn.calib_flops == 0 and rtn.decomp_flops == 0  # weight-only RTN reads no data
    line = arhq.line(cfg, 4096)
    assert line.startswith("plan: llama, 2 layers,") and "\n" not in line
    assert "GFLOP/s measured on cpu" in line
    streamed = preflight.estimate(cfg, QuantConfig(method="arhq", rank=8), 4096, 512, **kw)
    whole = preflight.estimate(
        cfg, QuantConfig(method="arhq", rank=8), 4096, 512, streamed=False, **kw
    )
    assert whole.host_bytes - streamed.host_bytes == 4 * preflight.count_params(cfg)[0]


def test_eta_leaves_the_first_layer_out():
    # the first layer (compiling) takes 100 s, then 10 s each
    assert eta_seconds([100.0], 9) is None
    assert eta_seconds([100.0, 110.0, 120.0], 8) == 80.0
    now = [0.0]
    bar = LayerProgress(10, 2, desc="t", disable=True, clock=lambda: now[0])
    assert "ETA after layer 2 (layer 1 compiles)" in bar.status()
    assert "stage 1/2 of layer 1" in bar.status()
    now[0] = 50.0
    bar.update(1)
    assert "stage 2/2 of layer 1" in bar.status()
    now[0] = 100.0
    bar.update(1)
    assert bar.done == 1 and bar.eta() is None
    for t in (110.0, 120.0, 130.0):
        now[0] = t
        bar.update(2)
    assert bar.done == 4
    assert bar.eta() == pytest.approx(60.0)  # 6 layers × 10 s: the 100 s layer not counted
    assert "10.0s/layer, ETA 1:00 (compilation excluded)" in bar.status()
    resumed = LayerProgress(10, 1, initial=4, desc="t", disable=True, clock=lambda: 0.0)
    assert "ETA after layer 6 (layer 5 compiles)" in resumed.status()
    bar.close()
    resumed.close()


def test_peek_requires_a_tokenizer_when_asked(tmp_path):
    g = T.write_gguf(tmp_path / "m.gguf")  # no tokenizer metadata
    assert preflight.peek_config(g) is not None
    with pytest.raises(ValueError, match=r"m.gguf has no tokenizer \(no tokenizer.ggml.model"):
        preflight.peek_config(g, require_tokenizer=True)
    bare = T.write_hf_dir(tmp_path / "bare", with_tokenizer=False)
    with pytest.raises(ValueError, match="bare has no tokenizer"):
        preflight.peek_config(bare, require_tokenizer=True)
    full = T.write_hf_dir(tmp_path / "full")
    assert preflight.peek_config(full, require_tokenizer=True) == T.config()
