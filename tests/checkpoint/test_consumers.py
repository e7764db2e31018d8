"""The exported checkpoint read by its consumers: compressed-tensors decompresses every NVFP4
weight bit for bit as arhq-jax does, and transformers (+ compressed-tensors, + peft for the LoRA
branch) loads the directory and gives arhq-jax's weight-only logits."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.evaluation import metrics as ev
from arhq_jax.linears.quantized import QuantLinear, weights_only
from arhq_jax.numerics import formats
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
from _ct_reference import ct_decompress  # noqa: E402

from converters.safetensors_io import SafetensorsReader  # noqa: E402


def _export(params, cfg, ids, qcfg, out, **kw):
    q = quantize_model(params, cfg, ids, qcfg, batch_size=8, progress=False).params
    checkpoint.save(out, q, cfg, quant=qcfg.to_dict(), **kw)
    return q


def _check_every_weight(out, qparams, cfg):
    """compressed-tensors' decompression of every exported weight == formats.dequantize."""
    hf = json.loads((out / "config.json").read_text())
    modules = hf["arhq_jax"]["modules"]
    n = 0
    with SafetensorsReader(sorted(out.glob("*.safetensors"))) as r:
        for i, layer in enumerate(qparams.layers):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                lin = getattr(layer, p)
                prefix = f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                assert isinstance(lin, QuantLinear) and modules[prefix]["kind"] == "ct-nvfp4"
                arrays = {k: r.get(f"{prefix}.{k}") for k in ("weight_packed", "weight_scale",
                                                             "weight_global_scale")}  # fmt: skip
                got = ct_decompress(arrays, torch.float32)
                ref = np.asarray(formats.dequantize(lin.w, jnp.float32)).view(np.uint32)
                np.testing.assert_array_equal(got, ref, err_msg=prefix)
                n += 1
    assert n == 7 * cfg.num_layers
    return n


def test_compressed_tensors_decodes_every_tiny_weight(model, tmp_path):
    params, ids = model
    out = tmp_path / "ck"
    q = _export(params, CFG, ids, QuantConfig(method="arhq", rank=4), out)
    _check_every_weight(out, q, CFG)


@pytest.mark.slow
def test_compressed_tensors_decodes_every_smollm2_weight(smollm2, tmp_path):
    out = tmp_path / "ck"
    ids = np.zeros((1, 16), np.int32)  # RTN weight-only reads no data
    q = _export(smollm2.params, smollm2.cfg, ids, QuantConfig(method="rtn", act_fmt=None), out)
    assert _check_every_weight(out, q, smollm2.cfg) == 210


def _hf_logits(out, ids, lora: bool, decode_dtype=None, monkeypatch=None):
    """transformers' logits of the export (dense weight-only linears decompressed by
    compressed-tensors, in bf16 unless ``decode_dtype`` overrides its unpacking dtype)."""
    from compressed_tensors.compressors.nvfp4 import base as ct_base
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if decode_dtype is not None:
        unpack = ct_base.unpack_fp4_from_uint8
        monkeypatch.setattr(
            ct_base, "unpack_fp4_from_uint8", lambda *a, **k: unpack(*a, dtype=decode_dtype)
        )
    m = AutoModelForCausalLM.from_pretrained(
        str(out),
        quantization_config=CompressedTensorsConfig(run_compressed=False),
        dtype=torch.float32,
    )
    if decode_dtype is not None:
        monkeypatch.undo()
    if lora:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(out / "lora"))
    m.eval()
    with torch.no_grad():
        return m(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


@pytest.mark.parametrize("method", ["rtn", "arhq"])
def test_transformers_and_peft_load_the_export(model, tmp_path, method, monkeypatch):
    params, ids = model
    out = tmp_path / method
    qcfg = QuantConfig(method=method, rank=4) if method == "arhq" else QuantConfig(method="rtn")
    q = _export(params, CFG, ids, qcfg, out)
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert (out / "lora").is_dir() == (method == "arhq")
    x = ids[:2]
    ours = np.asarray(ev.jitted_forward()(weights_only(q), CFG, jnp.asarray(x)))
    lora = method == "arhq"
    scale = np.abs(ours).max()
    # As shipped, compressed-tensors decompresses in bf16 (unpack_fp4_from_uint8's default):
    # every weight within 2^-8 relative of ours, so logits within ~1e-2 (measured 4.4e-3).
    theirs = _hf_logits(out, x, lora)
    assert np.abs(ours - theirs).max() / scale < 1e-2
    # Decompressed in f32, the weights are ours bit for bit; what is left is f32 summation
    # order (torch vs XLA) over K = 64..128 products per output and 2 layers.
    theirs = _hf_logits(out, x, lora, torch.float32, monkeypatch)
    err = np.abs(ours - theirs).max() / scale
    assert err < 2e-5, err
    # Without the adapter the ARHQ base is measurably off: the branch is really applied.
    if method == "arhq":
        base = _hf_logits(out, x, False, torch.float32, monkeypatch)
        assert np.abs(ours - base).max() / np.abs(ours).max() > 100 * err
