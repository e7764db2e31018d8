"""The model forward through the Pallas kernels (interpret mode) equals the plain jnp path.

Interpret mode is slow, so only the first two of SmolLM2-135M's 30 layers are quantized (every
projection a packed NVFP4/MXFP4 QuantLinear with a rank-16 branch); the rest stay float.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from arhq_jax.evaluation import metrics as ev
from arhq_jax.linears.quantized import with_kernel
from arhq_jax.models import transformer
from arhq_jax.models.config import GROUP_OF, PROJECTIONS
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

pytestmark = pytest.mark.slow


def _two_quantized_layers(smollm2, fmt, act):
    cfg, fp = smollm2.cfg, smollm2.params
    two = fp.replace(layers=fp.layers[:2])
    qcfg = QuantConfig(method="svdquant", rank=16, w_fmt=fmt, act_fmt=act)
    calib = None  # data-free, except for nvfp4 W4A4's static activation scales (calibrated)
    if qcfg.static_act_scale:
        calib = ev.split_tokens(ev.load_text_tokens(smollm2.tokenizer))[0][:256].reshape(2, 128)
    q2 = quantize_model(two, cfg.replace(num_layers=2), calib, qcfg, progress=False).params
    return cfg, fp, fp.replace(layers=q2.layers + fp.layers[2:])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_pallas_and_xla_give_the_same_perplexity_w4a16(smollm2, fmt):
    cfg, fp, q = _two_quantized_layers(smollm2, fmt, None)
    ids = ev.split_tokens(ev.load_text_tokens(smollm2.tokenizer))[1][: 2 * 64]
    xla = ev.evaluate(q, cfg, ids, seq_len=64, progress=False)
    pallas = ev.evaluate(
        with_kernel(q, "pallas", interpret=True), cfg, ids, seq_len=64, progress=False
    )
    float_ppl = ev.evaluate(fp, cfg, ids, seq_len=64, progress=False).ppl
    assert xla.n_chunks == pallas.n_chunks == 2
    assert 0.5 < xla.ppl / float_ppl < 2.0  # a real model, mildly perturbed
    assert pallas.ppl == pytest.approx(xla.ppl, rel=1e-5)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_pallas_and_xla_agree_on_real_activations_w4a4(smollm2, fmt):
    """W4A4 on SmolLM2's own layer-0 inputs: every projection within 1e-6 relative.

    (Whole-model perplexities are not compared for W4A4: the kernel's f32 summation order moves
    an output by ~1 ulp, which the next layer's 4-bit activation quantizer turns into occasional
    rounding flips, so two correct paths drift apart by a few 1e-3 in perplexity.)
    """
    cfg, fp, q = _two_quantized_layers(smollm2, fmt, fmt)
    assert (q.layers[0].q_proj.act_scale is not None) == (fmt == "nvfp4")  # static nvfp4 scale
    ids = ev.split_tokens(ev.load_text_tokens(smollm2.tokenizer))[1][:96].reshape(1, 96)
    h = transformer.embed(fp, cfg, jnp.asarray(ids))
    pos = jnp.arange(96)[None]
    _, _, cap = transformer.layer_forward(fp.layers[0], cfg, h, pos, capture=True)
    layer_p = with_kernel(q.layers[0], "pallas", interpret=True)
    for p in PROJECTIONS:
        x = cap[GROUP_OF[p]]
        y_x = np.asarray(getattr(q.layers[0], p)(x), np.float64)
        y_p = np.asarray(getattr(layer_p, p)(x), np.float64)
        assert np.linalg.norm(y_p - y_x) <= 1e-6 * np.linalg.norm(y_x), p
