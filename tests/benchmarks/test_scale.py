"""benchmarks/scale.py writes checkpoints the converters load with the shapes asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
from _bench_loader import load_benchmark  # noqa: E402

scale = load_benchmark("scale")

TINY = {
    "llama3-tiny": {**scale.SHAPES["llama3-8b"], "hidden_size": 64, "intermediate_size": 96,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "vocab_size": 49152},
    "qwen3-tiny": {**scale.SHAPES["qwen3-4b"], "hidden_size": 64, "intermediate_size": 96,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                   "vocab_size": 49152},
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(TINY))
def test_synthetic_checkpoint_loads_with_its_shapes(shape, tmp_path, monkeypatch):
    from converters import load_model

    monkeypatch.setitem(scale.SHAPES, shape, TINY[shape])
    size = scale.write_checkpoint(shape, 2, tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(files) == 4  # embeddings, 2 layers, norm (+ head)
    assert size == sum((tmp_path / "ck" / f).stat().st_size for f in files)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == files[2]
    m = load_model(str(tmp_path / "ck"), tokenizer=False)
    c = TINY[shape]
    assert m.cfg.num_layers == 2 and m.cfg.hidden_size == c["hidden_size"]
    assert m.cfg.family == c["model_type"]
    w = np.asarray(m.params.layers[1].down_proj.w)
    assert w.shape == (c["hidden_size"], c["intermediate_size"])
    assert 0.015 < w.std() < 0.025  # N(0, 0.02²) in bf16


def test_projection_is_linear_in_depth():
    rows = [
        {"layers": 2, "rc": 0, "wall_s": 10.0, "peak_rss_polled": 5e9, "calibration_s": 4.0},
        {"layers": 8, "rc": 0, "wall_s": 22.0, "peak_rss_polled": 6.2e9, "calibration_s": 16.0},
    ]
    p = scale.project(rows, 32)
    assert p["wall_s"] == pytest.approx(70.0) and p["wall_s_per_layer"] == pytest.approx(2.0)
    assert p["peak_rss_polled"] == pytest.approx(6.2e9 + 0.2e9 * 24)
    assert p["calibration_s"] == pytest.approx(64.0)
