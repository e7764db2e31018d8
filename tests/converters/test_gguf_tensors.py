"""GGUF tensors read in pieces (``converters.gguf.GGUFTensors``); one metadata parse per file.

The reference is gguf-py's own ``dequantize`` of the whole tensor (the decoder transformers
uses), with llama.cpp's q/k row permutation undone by ``unpermute_qk``: every row range, row
gather, strided sample and shape the lazy source asks for must equal the same piece of it bit for
bit, on the packaged SmolLM2 GGUF (Q8_0 embedding, Q4_1 projections, F32 norms).
"""

from __future__ import annotations

import numpy as np
import pytest

from converters import gguf as G


@pytest.fixture(scope="module")
def smollm2_gguf():
    from converters import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


NAMES = (
    "model.embed_tokens.weight",  # Q8_0, 49,152 rows
    "model.layers.0.self_attn.q_proj.weight",  # Q4_1, rows permuted by llama.cpp
    "model.layers.0.self_attn.k_proj.weight",  # Q4_1, permuted, kv heads
    "model.layers.29.mlp.down_proj.weight",  # Q4_1, 1536 columns
    "model.layers.3.input_layernorm.weight",  # F32, 1-D
    "model.norm.weight",
)


@pytest.fixture(scope="module")
def raw(smollm2_gguf):
    """gguf-py's own reader of the file, by HF name (parsed here, not through the cache)."""
    from gguf import GGUFReader

    return {G.hf_name(t.name): t for t in GGUFReader(str(smollm2_gguf)).tensors}


def _whole(raw, cfg, name) -> np.ndarray:
    from gguf import dequantize

    t = raw[name]
    w = dequantize(t.data, t.tensor_type)
    if ".q_proj." in name:
        w = G.unpermute_qk(w, cfg.num_heads)
    if ".k_proj." in name:
        w = G.unpermute_qk(w, cfg.num_kv_heads)
    return w


@pytest.mark.parametrize("name", NAMES)
def test_pieces_equal_gguf_py_dequantize(smollm2_gguf, raw, name):
    cfg, st = G.gguf_tensors(smollm2_gguf)
    want = _whole(raw, cfg, name)
    assert want.dtype == np.float32
    assert st.shape(name) == want.shape
    got = st.read(name)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    for step in (1, 7, max(1, want.size // 4096)):
        np.testing.assert_array_equal(st.strided(name, step), want.reshape(-1)[::step])
    if want.ndim == 2:
        n = want.shape[0]
        np.testing.assert_array_equal(st.rows(name, 3, 17), want[3:17])
        np.testing.assert_array_equal(st.rows(name, n - 5, n), want[n - 5 :])
        ids = np.array([[0, 5, 5, 1], [n - 1, 2, 3, 5]])
        np.testing.assert_array_equal(st.gather(name, ids), want[ids])


def test_missing_tensor_is_none(smollm2_gguf):
    _, st = G.gguf_tensors(smollm2_gguf)
    assert st.shape("lm_head.weight") is None and st.read("lm_head.weight") is None


def test_metadata_parsed_once_per_file_version(smollm2_gguf, monkeypatch):
    """The config, the tokenizer check and the tensors share one ``GGUFReader`` (parsing
    SmolLM2's metadata takes seconds); a rewritten file is parsed again."""
    import gguf

    made = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *a, **k):
            made.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    G._parsed.cache_clear()
    G.open_gguf(smollm2_gguf)
    assert G.gguf_has_tokenizer(smollm2_gguf)
    G.gguf_tensors(smollm2_gguf)
    assert len(made) == 1
    G._parsed.cache_clear()


def test_rewritten_file_is_parsed_again(tmp_path):
    import _tiny_cli as T

    path = T.write_gguf(tmp_path / "m.gguf")
    _, st = G.gguf_tensors(path)
    before = st.read("model.norm.weight").copy()
    path.unlink()
    T.write_gguf(path)  # the same tensors, a new file (new inode and mtime)
    _, st2 = G.gguf_tensors(path)
    np.testing.assert_array_equal(st2.read("model.norm.weight"), before)
    path.write_bytes(b"GGUF" + b"\0" * 20)  # a path-keyed cache would return the old parse
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        G.gguf_tensors(path)
