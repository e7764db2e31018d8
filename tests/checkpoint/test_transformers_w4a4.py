"""A bf16 source exported by ``arhq-jax quantize`` and read by transformers as a user would.

The tiny random Llama and Qwen3 of the CLI tests, stored in bf16, are quantized W4A4 NVFP4
(ARHQ, static activation scales) by the CLI. The checkpoint keeps the source's bf16 (embedding,
norms, factors; ``config.json`` declares it), so transformers' default load, with
compressed-tensors' own NVFP4 activation fake-quant, runs out of the box (in float32 it fails:
compressed-tensors decompresses the weights to bf16). Its perplexity, with the LoRA branch
attached by peft, is held to ``arhq-jax eval``'s on the same chunks; compressed-tensors'
activation quantizer (``forward_quantize`` with the loaded ``input_global_scale``) to arhq-jax's
``formats.fake_quant`` bit for bit; and the weight-only load (``dequantize=True``, W4A16) to
``eval --weights-only``.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _tiny_cli import config, params, tokenizer

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from arhq_jax.evaluation.metrics import make_chunks
from arhq_jax.evaluation.pipeline import load_corpus
from arhq_jax.numerics import formats
from converters import save_hf_dir
from converters.registry import _hf_tokenizer
from converters.safetensors_io import SafetensorsReader

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
pytest.importorskip("peft")

SEQ, CHUNKS = 128, 8
PROJ = "model.layers.0.self_attn.q_proj"


def _bf16_source(path, family: str):
    """The CLI tests' tiny model (``_tiny_cli``) with bf16 weights, as a bf16 HF directory."""
    import jax

    cfg = config(family).replace(param_dtype="bfloat16", dtype="bfloat16")
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params(config(family)))
    return save_hf_dir(cfg, p, path, tokenizer=tokenizer())


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def export(request, tmp_path_factory):
    """``(source dir, checkpoint dir)``: ARHQ r8 W4A4 by the CLI."""
    d = tmp_path_factory.mktemp(f"w4a4-{request.param}")
    src = _bf16_source(d / "src", request.param)
    out = d / "ck"
    rc = main(["quantize", "--model", str(src), "--method", "arhq", "--rank", "8",
               "--calib-tokens", "2048", "--calib-seq-len", str(SEQ),
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    return src, out


def _eval(src, out, capsys, *extra) -> dict:
    capsys.readouterr()
    rc = main(["eval", "--model", str(src), "--quantized", str(out), "--seq-len", str(SEQ),
               "--max-chunks", str(CHUNKS), "--json", *extra])  # fmt: skip
    assert rc == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _chunks(out) -> np.ndarray:
    """The chunks ``arhq-jax eval`` scores: the pydoc evaluation text, tokenized with the
    checkpoint's own tokenizer, cut as eval cuts it."""
    return make_chunks(load_corpus(_hf_tokenizer(out), None, None).eval, SEQ, CHUNKS)


def _ppl(model, chunks) -> float:
    """Perplexity of a transformers model over ``chunks`` as arhq-jax computes it: the mean
    NLL (log-softmax in f32) of every token after the first of each chunk."""
    ids = torch.from_numpy(chunks.astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(torch.exp(nll.double().mean()))


def _w4a4_model(out):
    """The README's W4A4 load: the plain default load, weights decompressed now (else at the
    first forward), then peft's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out))
    m.hf_quantizer.compressor.decompress_model(m)
    return m, PeftModel.from_pretrained(m, str(out / "lora")).eval()


def _ct(module):
    """compressed-tensors' linear under peft's wrapper (peft injects its layers in place)."""
    return getattr(module, "base_layer", module)


def test_a_bf16_source_is_stored_and_declared_bf16(export):
    src, out = export
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == "bfloat16" and hf["arhq_jax"]["param_dtype"] == "bfloat16"
    assert hf["arhq_jax"]["recipe"]["factor_dtype"] == "bfloat16"
    bf16 = np.dtype(ml_dtypes.bfloat16)
    with (
        SafetensorsReader([out / "model.safetensors"]) as r,
        SafetensorsReader([src / "model.safetensors"]) as s,
        SafetensorsReader([out / "lora" / "adapter_model.safetensors"]) as lr,
    ):
        for name in ("model.embed_tokens.weight", "model.norm.weight",
                     "model.layers.1.post_attention_layernorm.weight"):  # fmt: skip
            got = r.get(name)
            assert got.dtype == bf16
            np.testing.assert_array_equal(got.view(np.uint16), s.get(name).view(np.uint16))
        assert {lr.get(n).dtype for n in lr.names()} == {bf16}
        # The loaded model (what `arhq-jax eval` runs) holds the stored factors as stored.
        loaded, cfg, _ = checkpoint.load(out)
        a_t = lr.get(f"base_model.model.{PROJ}.lora_A.weight")
        lin = loaded.layers[0].q_proj
        assert cfg.param_dtype == "bfloat16" and lin.a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(lin.a).T.view(np.uint16), a_t.view(np.uint16))
        assert r.get(f"{PROJ}.input_global_scale").dtype == np.float32


def test_transformers_default_w4a4_load_with_peft_matches_eval(export, capsys):
    """Plain ``from_pretrained(dir)`` gives a bf16 model with compressed-tensors' W4A4
    fake-quant; with the branch attached its perplexity is within 1 % of ``arhq-jax eval``'s."""
    src, out = export
    ours = _eval(src, out, capsys)
    base, model = _w4a4_model(out)
    assert base.dtype == torch.bfloat16
    assert _ct(base.model.layers[0].self_attn.q_proj).quantization_scheme.input_activations
    chunks = _chunks(out)
    assert ours["tokens"] == chunks.size - len(chunks)
    theirs = _ppl(model, chunks)
    ratio = theirs / ours["ppl"]
    print(f"W4A4 transformers+peft ppl {theirs:.4f} vs arhq-jax eval {ours['ppl']:.4f}: {ratio}")
    assert abs(ratio - 1) < 0.01, ratio
    # The branch is really applied: without it the perplexity is measurably elsewhere.
    with model.disable_adapter():
        bare = _ppl(model, chunks)
    assert abs(bare / ours["ppl"] - 1) > 4 * abs(ratio - 1), (bare, theirs, ours["ppl"])


def test_compressed_tensors_activation_quantizer_is_ours_bit_for_bit(export):
    """compressed-tensors' own ``forward_quantize`` on a loaded module (its stored
    ``input_global_scale``, dynamic per-16 E4M3 block scales) equals ``formats.fake_quant``
    with the scale arhq-jax loads, bit for bit: on the activations the module really receives
    (captured from the bf16 model) and on f32 inputs with outliers."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    _, out = export
    base, _ = _w4a4_model(out)
    loaded, _, _ = checkpoint.load(out)
    n = 0
    for i, layer in enumerate(base.model.layers):
        for mod, lin in (
            (_ct(layer.self_attn.q_proj), loaded.layers[i].q_proj),
            (_ct(layer.mlp.down_proj), loaded.layers[i].down_proj),
        ):
            seen = []
            hook = mod.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
            with torch.no_grad():
                base(torch.from_numpy(_chunks(out)[:2].astype(np.int64)))
            hook.remove()
            rng = np.random.default_rng(i)
            k = mod.in_features
            wild = rng.standard_normal((64, k)).astype(np.float32)
            wild *= np.exp(rng.uniform(-6, 6, (64, 1))).astype(np.float32)
            for x in (seen[0].float().reshape(-1, k).numpy(), wild):
                args = mod.quantization_scheme.input_activations
                theirs = forward_quantize(mod, torch.from_numpy(x), "input", args).numpy()
                scale = lin.act_scale
                assert float(mod.input_global_scale) == float(scale)
                ours = np.asarray(formats.fake_quant(jnp.asarray(x), "nvfp4", tensor_scale=scale))
                np.testing.assert_array_equal(theirs.view(np.uint32), ours.view(np.uint32))
                n += 1
    assert n == 4 * len(base.model.layers)


def test_weights_only_load_with_peft_matches_eval_weights_only(export, capsys):
    """The W4A16 load (``dequantize=True``) with the branch: perplexity within 1 % of ``eval
    --weights-only``; the only keys it leaves unused are the activation scales (W4A16 reads
    none), one per quantized linear."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, out = export
    ours = _eval(src, out, capsys, "--weights-only")
    base, info = AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=CompressedTensorsConfig(dequantize=True),
        output_loading_info=True,
    )  # fmt: skip
    unexpected = info["unexpected_keys"]
    assert len(unexpected) == 7 * len(base.model.layers)
    assert all(k.endswith(".input_global_scale") for k in unexpected), sorted(unexpected)[:3]
    assert not info["missing_keys"]
    model = PeftModel.from_pretrained(base, str(out / "lora")).eval()
    theirs = _ppl(model, _chunks(out))
    ratio = theirs / ours["ppl"]
    print(f"W4A16 transformers+peft ppl {theirs:.4f} vs eval --weights-only {ours['ppl']:.4f}")
    assert abs(ratio - 1) < 0.01, ratio


def test_quantize_dtype_overrides_the_source_dtype(tmp_path, capsys):
    """``--dtype float32`` on the bf16 source: f32 tensors and ``dtype`` declared float32 (the
    factors too); the size ratio is against the source as stored (bf16 safetensors)."""
    src = _bf16_source(tmp_path / "src", "llama")
    out = tmp_path / "ck"
    rc = main(["quantize", "--model", str(src), "--method", "rtn", "--act-format", "none",
               "--calib-seq-len", "64", "--calib-tokens", "256",
               "--dtype", "float32", "--out", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == "float32" and hf["arhq_jax"]["param_dtype"] == "float32"
    with SafetensorsReader([out / "model.safetensors"]) as r:
        assert r.get("model.embed_tokens.weight").dtype == np.float32
        nbytes = sum(int(np.prod(r.info(n).shape)) * r.get(n).itemsize for n in r.names())
    with SafetensorsReader([src / "model.safetensors"]) as r:
        src_bytes = sum(r.info(n).end - r.info(n).begin for n in r.names())
    line = next(s for s in text.splitlines() if s.startswith("saved "))
    assert "(float32) vs the source's" in line and "safetensors BF16" in line, line
    ratio = float(line.rsplit("ratio ", 1)[1])
    assert abs(ratio - nbytes / src_bytes) < 0.01, (ratio, nbytes, src_bytes)
