"""``export --to modelopt`` read back by NVIDIA ModelOpt's own code: its NVFP4 dequantization
(``NVFP4QTensor.dequantize``) of every exported weight against arhq-jax's decode, and its own
config writers (``process_layer_quant_config``, ``convert_hf_quant_config_format``) against the
exported ``hf_quant_config.json`` and ``quantization_config``."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import export_modelopt as em
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from arhq_jax.models.config import PROJECTIONS
from arhq_jax.models.params import linear_key
from arhq_jax.numerics import formats
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.quantization.qtensor")
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format  # noqa: E402
from modelopt.torch.export.quant_utils import process_layer_quant_config  # noqa: E402
from modelopt.torch.quantization.qtensor import NVFP4QTensor  # noqa: E402

from converters.safetensors_io import SafetensorsReader  # noqa: E402

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


@pytest.fixture(scope="module")
def ckpts(model, tmp_path_factory):
    """``{"w4a4": (dir, qparams), "w4a16": ..., "mxfp4": ...}``: SVDQuant r=4 (LoRA branch),
    W4A4 and weight-only compressed-tensors, and an MXFP4 (own layout) checkpoint."""
    params, ids = model
    root = tmp_path_factory.mktemp("mo")
    out = {}
    for name, qcfg in (
        ("w4a4", QuantConfig(method="svdquant", rank=4)),
        ("w4a16", QuantConfig(method="rtn", act_fmt=None)),
        ("mxfp4", QuantConfig(method="rtn", w_fmt="mxfp4", act_fmt="mxfp4")),
    ):
        q = quantize_model(params, CFG, ids, qcfg, batch_size=8, progress=False).params
        checkpoint.save(root / name, q, CFG, quant=qcfg.to_dict())
        out[name] = (root / name, q)
    return out


def load_file(path) -> dict:
    """Every tensor of a safetensors file as numpy (float8 included: ml_dtypes)."""
    with SafetensorsReader([path]) as r:
        return {n: np.array(r.get(n)) for n in r.names()}


def _linears(q):
    for i, layer in enumerate(q.layers):
        for p in PROJECTIONS:
            yield linear_key(i, p), getattr(layer, p)


def _modelopt_decode(t: dict, prefix: str, shape) -> np.ndarray:
    qt = NVFP4QTensor(torch.Size(shape), torch.float32, torch.from_numpy(t[f"{prefix}.weight"]))
    scale = torch.from_numpy(t[f"{prefix}.weight_scale"].view(np.uint8)).view(torch.float8_e4m3fn)
    g = torch.from_numpy(t[f"{prefix}.weight_scale_2"])
    y = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=g, block_sizes={-1: 16})
    return y.numpy()


@pytest.mark.parametrize("kind", ["w4a4", "w4a16"])
def test_modelopt_decodes_every_weight(ckpts, kind, tmp_path):
    src, q = ckpts[kind]
    out = tmp_path / "mo"
    line = em.export_modelopt(src, out)
    t = load_file(str(out / "model.safetensors"))
    n = off_blocks = blocks = 0
    for prefix, lin in _linears(q):
        n_out, k = lin.w.shape
        got = _modelopt_decode(t, prefix, (n_out, k))
        # the layout: ModelOpt's decode is v(code) · fl32(s · g), low nibble first (float64 ref)
        codes = t[f"{prefix}.weight"]
        v = E2M1[np.stack([codes & 15, codes >> 4], -1).reshape(n_out, k)]
        s = t[f"{prefix}.weight_scale"].astype(np.float32)
        g = t[f"{prefix}.weight_scale_2"]
        assert g.dtype == np.float32 and g.shape == ()
        d = (s * g).astype(np.float32)
        ref = (v * np.repeat(d, 16, axis=1)).astype(np.float32)
        np.testing.assert_array_equal(got, ref, err_msg=prefix)
        # against arhq-jax's decode: bit for bit on every block where fl(s·g) = fl(s/gs); the
        # others' multipliers are 1 ulp apart, so their weights differ by at most 2^-22 relative
        ours = np.asarray(formats.dequantize(lin.w, jnp.float32))
        gs = np.float32(np.asarray(lin.w.tensor_scale))
        same = (d.view(np.uint32) == (s / gs).astype(np.float32).view(np.uint32)).repeat(16, 1)
        np.testing.assert_array_equal(got[same], ours[same], err_msg=prefix)
        diff = np.abs(got.astype(np.float64) - ours)
        assert np.all(diff <= 2.0**-22 * np.abs(ours)), prefix
        off_blocks += int((~same[:, ::16]).sum())
        blocks += d.size
        n += 1
    assert n == 7 * CFG.num_layers
    assert f"{blocks - off_blocks}/{blocks} blocks decode bit-identical" in line
    # q/k/v and gate/up share weight_scale_2, as TensorRT-LLM's fused projections need
    for i in range(CFG.num_layers):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            gs = {t[f"{linear_key(i, p)}.weight_scale_2"].tobytes() for p in group}
            assert len(gs) == 1


def test_scales_configs_and_copied_files(ckpts, tmp_path):
    src, q = ckpts["w4a4"]
    out = tmp_path / "mo"
    em.export_modelopt(src, out)
    t = load_file(str(out / "model.safetensors"))
    src_t = load_file(str(src / "model.safetensors"))
    for prefix, _ in _linears(q):
        igs = src_t[f"{prefix}.input_global_scale"]
        x = t[f"{prefix}.input_scale"]
        assert x.dtype == np.float32 and x.shape == ()
        assert x == np.float32(1) / igs[0]  # ModelOpt's amax/(6·448), compressed-tensors' 1/that
        np.testing.assert_allclose(float(x) * float(igs[0]), 1.0, rtol=1e-7)
        assert t[f"{prefix}.weight"].dtype == np.uint8
        assert not {f"{prefix}.{k}" for k in ("weight_packed", "weight_global_scale")} & set(t)
    for name in t:  # every float tensor is the checkpoint's own, unchanged
        if name in src_t:
            np.testing.assert_array_equal(t[name], src_t[name])
    # ModelOpt's own config writers give the same hf_quant_config.json and quantization_config
    hq = json.loads((out / "hf_quant_config.json").read_text())
    layers = {}
    for prefix, _ in _linears(q):
        layers |= {f"{prefix}.quantization": "nvfp4", f"{prefix}.awq_block_size": 16}
    layers |= {"lm_head.quantization": None, "lm_head.awq_block_size": 0}
    want = {"quant_algo": None, "kv_cache_quant_algo": None} | process_layer_quant_config(layers)
    assert hq["quantization"] == want
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == convert_hf_quant_config_format(hq)
    assert "arhq_jax" not in cfg and cfg["model_type"] == "llama"
    # the LoRA branch: the PEFT adapter, byte for byte
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "lora" / f).read_bytes() == (src / "lora" / f).read_bytes()


def test_weight_only_algo(ckpts, tmp_path):
    src, q = ckpts["w4a16"]
    out = tmp_path / "mo"
    em.export_modelopt(src, out)
    hq = json.loads((out / "hf_quant_config.json").read_text())
    layers = {}
    for prefix, _ in _linears(q):
        layers |= {f"{prefix}.quantization": "w4a16_nvfp4", f"{prefix}.awq_block_size": 16}
    layers |= {"lm_head.quantization": None, "lm_head.awq_block_size": 0}
    assert hq["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None} | (
        process_layer_quant_config(layers)
    )
    assert not any(k.endswith("input_scale") for k in load_file(str(out / "model.safetensors")))
    assert not (out / "lora").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == convert_hf_quant_config_format(hq)


def test_weight_scale_2_search_is_exact_when_possible():
    """A global scale whose reciprocal reproduces every division: g is found and exact."""
    scales = np.array([0.25, 1.5, 3.0, 448.0], np.float32)
    g, bad = em.weight_scale_2(np.float32(4.0), scales)
    assert (g, bad) == (np.float32(0.25), 0)
    g, bad = em.weight_scale_2(np.float32(2688 / 1.7), scales)
    want = (scales / np.float32(2688 / 1.7)).astype(np.float32)
    got = (scales * g).astype(np.float32)
    assert int((got != want).sum()) == bad


def test_errors_are_one_line(ckpts, tmp_path, capsys):
    src, _ = ckpts["mxfp4"]
    with pytest.raises(ValueError, match="needs a compressed-tensors NVFP4 checkpoint"):
        em.export_modelopt(src, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        em.export_modelopt(tmp_path / "nope", tmp_path / "b")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not an arhq-jax checkpoint"):
        em.export_modelopt(foreign, tmp_path / "c")
    w4a4, _ = ckpts["w4a4"]
    with pytest.raises(FileExistsError, match="not replacing it"):
        em.export_modelopt(w4a4, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the CLI: a one-line error and exit 2; a second export replaces the first (ours)
    assert main(["export", str(src), "--to", "modelopt", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arhq-jax export: error: ") and "\n" not in err
    argv = ["export", str(w4a4), "--to", "modelopt", "--out", str(tmp_path / "f")]
    assert main([*argv, "--tokenizer", "x.gguf"]) == 2
    assert "--tokenizer is for --to gguf" in capsys.readouterr().err
    out = tmp_path / "e"
    for _ in range(2):
        assert main(["export", str(w4a4), "--to", "modelopt", "--out", str(out)]) == 0
    assert "ModelOpt NVFP4 (TensorRT-LLM), LoRA adapter lora/ (PEFT)" in capsys.readouterr().out
