"""``export --to gguf`` read back by gguf-py (llama.cpp's Python package): its MXFP4 and NVFP4
dequantizers (``gguf.quants.dequantize``) of every exported weight against arhq-jax's decode, bit
for bit (NVFP4: the block part; the per-tensor ``.scale`` to 2^-22 relative); the
LoRA adapter file's tensors against the checkpoint's PEFT factors; the metadata against the model
config (through the project's GGUF reader) and the tokenizer source."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import export_gguf as eg
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from arhq_jax.models.config import PROJECTIONS
from arhq_jax.models.params import linear_key, random_params
from arhq_jax.numerics import formats
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model
from converters.gguf import gguf_hf_config, gguf_name, load_gguf, permute_qk
from converters.safetensors_io import SafetensorsReader

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

HEADS = {"q_proj": CFG.num_heads, "k_proj": CFG.num_kv_heads}
CFG128 = dataclasses.replace(CFG, intermediate_size=128)


def _tokenizer_gguf(path, vocab: int):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["t o", "to k"])
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def ckpts(model, tmp_path_factory):
    """MXFP4 checkpoints (SVDQuant r=4 with its LoRA branch; RTN without), NVFP4 ones (W4A4 SVDQuant
    r=4 of a model whose K are multiples of 64; RTN of the tiny Llama, intermediate size 96), an
    int4 one, and a tokenizer GGUF of the tiny vocabulary."""
    params, ids = model
    root = tmp_path_factory.mktemp("gg")
    out = {"tok": _tokenizer_gguf(root / "tok.gguf", CFG.vocab_size)}
    for name, qcfg in (
        ("svdquant", QuantConfig(method="svdquant", rank=4, w_fmt="mxfp4", act_fmt="mxfp4")),
        ("rtn", QuantConfig(method="rtn", w_fmt="mxfp4", act_fmt=None)),
        ("nvfp4", QuantConfig(method="rtn", act_fmt=None)),
        ("int4", QuantConfig(method="rtn", w_fmt="int4", act_fmt=None)),
        ("nvfp4-128", QuantConfig(method="svdquant", rank=4)),
    ):
        cfg, p = CFG, params
        if name == "nvfp4-128":
            cfg = CFG128
            p = random_params(cfg, jax.random.key(0), std=0.08)
        q = quantize_model(p, cfg, ids, qcfg, batch_size=8, progress=False).params
        checkpoint.save(root / name, q, cfg, quant=qcfg.to_dict(), source={"model": "x"})
        out[name] = (root / name, q)
    return out


def _linears(q):
    for i, layer in enumerate(q.layers):
        for p in PROJECTIONS:
            yield p, linear_key(i, p), getattr(layer, p)


def _perm(p: str, x: np.ndarray) -> np.ndarray:
    return permute_qk(x, HEADS[p]) if p in HEADS else x


def _canon(x) -> np.ndarray:
    return (np.asarray(x, np.float32) + np.float32(0)).view(np.uint32)  # -0.0 -> +0.0


def test_gguf_dequantizes_every_weight_bit_for_bit(ckpts, tmp_path):
    src, q = ckpts["svdquant"]
    out = tmp_path / "m.gguf"
    line = eg.export_gguf(src, out, tokenizer_gguf=ckpts["tok"])
    assert f"+ LoRA adapter {tmp_path / 'm.lora.gguf'} (14 pairs, alpha 4)" in line
    r = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in r.tensors}
    n = 0
    for p, prefix, lin in _linears(q):
        t = tensors[gguf_name(f"{prefix}.weight")]
        assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
        got = dequantize(t.data, t.tensor_type)
        ours = _perm(p, np.asarray(formats.dequantize(lin.w, jnp.float32)))
        assert got.shape == ours.shape == lin.w.shape
        np.testing.assert_array_equal(_canon(got), _canon(ours), err_msg=prefix)
        n += 1
    assert n == 7 * CFG.num_layers
    # the float tensors: exact, norms in F32
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, np.asarray(q.embed))
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, np.asarray(q.final_norm))
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    # the project's own GGUF reader (which undoes llama.cpp's q/k permutation) loads it back
    cfg, params = load_gguf(out)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (
        CFG.hidden_size,
        CFG.num_layers,
        CFG.num_kv_heads,
        CFG.head_dim,
    )
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.vocab_size) == (
        CFG.rms_norm_eps,
        CFG.rope_theta,
        CFG.vocab_size,
    )
    for i, layer in enumerate(params.layers):
        for p in PROJECTIONS:
            ref = np.asarray(formats.dequantize(getattr(q.layers[i], p).w, jnp.float32))
            np.testing.assert_array_equal(_canon(getattr(layer, p).w), _canon(ref))
    # the tokenizer metadata: the source GGUF's fields, unchanged
    tok = gguf.GGUFReader(str(ckpts["tok"]))
    for key, f in tok.fields.items():
        if key.startswith("tokenizer."):
            assert r.fields[key].contents() == f.contents(), key
    assert gguf_hf_config(r, out)["eos_token_id"] == 0


def test_lora_adapter_file_holds_the_checkpoint_factors(ckpts, tmp_path):
    src, q = ckpts["svdquant"]
    out = tmp_path / "m.gguf"
    eg.export_gguf(src, out, tokenizer_gguf=ckpts["tok"])
    r = gguf.GGUFReader(str(tmp_path / "m.lora.gguf"))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(4.0)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 7 * CFG.num_layers
    with SafetensorsReader([src / "lora" / "adapter_model.safetensors"]) as peft:
        for p, prefix, _ in _linears(q):
            name = gguf_name(f"{prefix}.weight")
            a = peft.get(f"base_model.model.{prefix}.lora_A.weight")
            b = peft.get(f"base_model.model.{prefix}.lora_B.weight")
            ta, tb = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
            # llama.cpp: a is ne (K, r), b is ne (r, N) with rank b->ne[0]
            assert list(ta.shape) == [CFG.hidden_size if p != "down_proj" else 96, 4]
            assert int(tb.shape[0]) == 4
            np.testing.assert_array_equal(ta.data, a)
            np.testing.assert_array_equal(tb.data, _perm(p, b))


def test_no_branch_no_adapter_and_ours_replaced(ckpts, tmp_path, capsys):
    src, _ = ckpts["rtn"]
    out = tmp_path / "m.gguf"
    eg.export_gguf(ckpts["svdquant"][0], out, tokenizer_gguf=ckpts["tok"])
    assert (tmp_path / "m.lora.gguf").is_file()
    argv = ["export", str(src), "--to", "gguf", "--out", str(out), "--tokenizer", str(ckpts["tok"])]
    for _ in range(2):  # each run replaces the files we wrote, the stale adapter included
        assert main(argv) == 0
    assert "GGUF MXFP4 (llama" in capsys.readouterr().out
    assert not (tmp_path / "m.lora.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left


def test_errors_are_one_line(ckpts, tmp_path, capsys):
    tok = ckpts["tok"]
    nv, _ = ckpts["nvfp4"]
    with pytest.raises(ValueError, match="down_proj: nvfp4 weight .* K a multiple of 64"):
        eg.export_gguf(nv, tmp_path / "a.gguf", tokenizer_gguf=tok)
    i4, _ = ckpts["int4"]
    with pytest.raises(ValueError, match="needs an MXFP4 .* or compressed-tensors NVFP4"):
        eg.export_gguf(i4, tmp_path / "a.gguf", tokenizer_gguf=tok)
    mx, _ = ckpts["svdquant"]
    with pytest.raises(ValueError, match="source 'x' is not a GGUF file here.*--tokenizer"):
        eg.export_gguf(mx, tmp_path / "b.gguf")
    small = _tokenizer_gguf(tmp_path / "small.gguf", 7)
    with pytest.raises(ValueError, match="its tokenizer has 7 tokens"):
        eg.export_gguf(mx, tmp_path / "c.gguf", tokenizer_gguf=small)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"not written by us")
    with pytest.raises(FileExistsError, match="not written by arhq-jax"):
        eg.export_gguf(mx, foreign, tokenizer_gguf=tok)
    assert foreign.read_bytes() == b"not written by us"
    with pytest.raises(FileExistsError, match="not written by arhq-jax"):  # a foreign GGUF too
        eg.export_gguf(mx, small, tokenizer_gguf=tok)
    with pytest.raises(ValueError, match="ending in .gguf"):
        eg.export_gguf(mx, tmp_path / "d.bin", tokenizer_gguf=tok)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        eg.export_gguf(tmp_path / "nope", tmp_path / "e.gguf", tokenizer_gguf=tok)
    assert not any(p.name.startswith(("a.", "b.", "c.", "e.", ".")) for p in tmp_path.iterdir())
    argv = ["export", str(nv), "--to", "gguf", "--out", str(tmp_path / "f.gguf")]
    assert main([*argv, "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arhq-jax export: error: ") and "\n" not in err


def test_nvfp4_blocks_bit_for_bit_and_tensor_scale(ckpts, tmp_path):
    src, q = ckpts["nvfp4-128"]
    out = tmp_path / "n.gguf"
    line = eg.export_gguf(src, out, tokenizer_gguf=ckpts["tok"])
    assert "GGUF NVFP4 (llama" in line and "LoRA adapter" in line
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == 39
    tensors = {t.name: t for t in r.tensors}
    n = 0
    for p, prefix, lin in _linears(q):
        name = gguf_name(f"{prefix}.weight")
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.NVFP4
        got = dequantize(t.data, t.tensor_type)  # v(code) · s, ggml's decode of the blocks
        blocks = dataclasses.replace(lin.w, tensor_scale=jnp.float32(1))  # fl(s / 1) = s
        ours = _perm(p, np.asarray(formats.dequantize(blocks, jnp.float32)))
        np.testing.assert_array_equal(_canon(got), _canon(ours), err_msg=prefix)
        base = name[: -len(".weight")]
        g = tensors[f"{base}.scale"].data
        assert g.dtype == np.float32 and g.shape == (1,)
        full = _perm(p, np.asarray(formats.dequantize(lin.w, jnp.float32)))
        eff = got.astype(np.float64) * float(g[0])  # llama.cpp scales the matmul output by g
        assert np.all(np.abs(eff - full) <= 2.0**-22 * np.abs(full)), prefix
        igs = float(np.asarray(lin.act_scale))
        assert tensors[f"{base}.input_scale"].data[0] == np.float32(1 / np.float32(igs))
        n += 1
    assert n == 7 * CFG128.num_layers
