"""The model forward through the Pallas kernels (interpret mode) equals the plain jnp path.

SmolLM2-135M cut to its first two layers keeps interpret mode fast; every projection of those
layers is a packed NVFP4/MXFP4 QuantLinear with a rank-16 branch.
"""

from __future__ import annotations

import numpy as np
import pytest

from arhq_jax import eval as ev
from arhq_jax.qlinear import with_kernel
from arhq_jax.quant_config import QuantConfig
from arhq_jax.quantize_model import quantize_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt,act", [("nvfp4", "nvfp4"), ("mxfp4", None)])
def test_pallas_and_xla_give_the_same_perplexity(smollm2, fmt, act):
    cfg = smollm2.cfg.replace(num_layers=2)
    params = smollm2.params.replace(layers=smollm2.params.layers[:2])
    qcfg = QuantConfig(method="svdquant", rank=16, w_fmt=fmt, act_fmt=act)
    q = quantize_model(params, cfg, None, qcfg, progress=False).params
    ids = ev.split_tokens(ev.load_text_tokens(smollm2.tokenizer))[1][: 2 * 64]
    xla = ev.evaluate(q, cfg, ids, seq_len=64, progress=False)
    pallas = ev.evaluate(
        with_kernel(q, "pallas", interpret=True), cfg, ids, seq_len=64, progress=False
    )
    assert xla.n_chunks == pallas.n_chunks == 2
    assert np.isfinite(xla.ppl)
    assert pallas.ppl == pytest.approx(xla.ppl, rel=1e-5)
