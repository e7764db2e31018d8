"""``qlinear.weights_only``: a W4A4 model with its activations unquantized is, bit for bit, the
W4A16 model the same method builds directly (tiny random Llama)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.linears.quantized import FakeQuantLinear, QuantLinear, dequantized, weights_only
from arhq_jax.methods.layer_methods import OutSplitLinear
from arhq_jax.methods.resq import ResQLinear
from arhq_jax.methods.serq import SERQLinear
from arhq_jax.models import transformer
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

_LINEARS = (QuantLinear, FakeQuantLinear, SERQLinear, ResQLinear)


def _quantize(model, **kw):
    params, ids = model
    return quantize_model(params, CFG, ids, QuantConfig(**kw), batch_size=3, progress=False).params


def _linears(tree):
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, _LINEARS))
    return [n for n in leaves if isinstance(n, _LINEARS)]


def _assert_same_bits(a, b):
    """Same pytree structure (static fields included) and bit-identical arrays."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# (method, weight format, activation format, extra QuantConfig fields): these methods' weights do
# not depend on the activation format, so their W4A16 build is the W4A4 one without act quant.
CASES = [
    ("rtn", "nvfp4", "nvfp4", {}),
    ("svdquant", "nvfp4", "nvfp4", {"rank": 8}),
    ("svdquant", "mxfp4", "mxfp4", {"rank": 8, "residual_quant": "gptq"}),
    # Not sequential: sequential calibration sees the earlier layers' quantized activations.
    ("gptq", "int4", "int4", {"sequential": False}),
    ("serq", "mxfp4", "mxfp4", {"rank": 16}),
    ("serq", "int4", "int4", {"rank": 16}),
    ("resq", "int4", "int4", {"residual_quant": "rtn"}),
]


@pytest.mark.parametrize(("method", "w_fmt", "act", "kw"), CASES, ids=lambda c: str(c))
def test_weights_only_is_the_w4a16_model_bit_for_bit(model, method, w_fmt, act, kw):
    w4a4 = _quantize(model, method=method, w_fmt=w_fmt, act_fmt=act, **kw)
    w4a16 = _quantize(model, method=method, w_fmt=w_fmt, act_fmt=None, **kw)
    stripped = weights_only(w4a4)
    _assert_same_bits(stripped, w4a16)  # same residual codes, scales, factors, static fields
    assert len(_linears(stripped)) == CFG.num_layers * 7
    ids = jnp.asarray(model[1][:2])
    a = np.asarray(transformer.forward(stripped, CFG, ids))
    b = np.asarray(transformer.forward(w4a16, CFG, ids))
    c = np.asarray(transformer.forward(w4a4, CFG, ids))
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)  # the activation quantizer was really on before


def test_weights_only_keeps_arhq_and_smoothquant_weights(model):
    """ARHQ and SmoothQuant have no W4A16 build of their own: their weights, factors and
    divisors are kept and the forward is the unquantized-activation matmul (formats' dequant,
    f32 HIGHEST) of each linear, checked against numpy float64."""
    x = np.asarray(jax.random.normal(jax.random.key(5), (3, CFG.hidden_size)), np.float32)
    for kw in ({"method": "arhq", "rank": 8}, {"method": "smoothquant"}):  # smoothquant: s, int8
        q = _quantize(model, **kw)
        s = weights_only(q)
        assert all(lin.act_fmt is None and lin.act_scale is None for lin in _linears(s))
        before = [(lin.w, lin.a, lin.b, lin.smooth) for lin in _linears(q)]
        after = [(lin.w, lin.a, lin.b, lin.smooth) for lin in _linears(s)]
        _assert_same_bits(before, after)
        lin = dequantized(s).layers[0].q_proj
        xs = x.astype(np.float64)
        if lin.smooth is not None:
            xs = xs / np.asarray(lin.smooth, np.float64)
        ref = xs @ np.asarray(lin.w, np.float64).T
        if lin.a is not None:
            ref += (xs @ np.asarray(lin.a, np.float64)) @ np.asarray(lin.b, np.float64).T
        got = np.asarray(s.layers[0].q_proj(jnp.asarray(x)), np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        quant = np.asarray(q.layers[0].q_proj(jnp.asarray(x)), np.float64)
        assert np.abs(quant - ref).max() > 1e-3 * np.abs(ref).max()  # W4A4 differs


def test_weights_only_reaches_nested_and_fake_quant_linears(model):
    q = _quantize(model, method="rtn", w_fmt="nvfp4", act_fmt="nvfp4")
    lin = q.layers[0].q_proj.replace(act_scale=jnp.float32(0.5))  # a static activation scale
    tree = {
        "split": OutSplitLinear(parts=(lin, q.layers[0].k_proj)),
        "fake": dequantized(q.layers[1]),
        "float": jnp.ones(3),
    }
    s = weights_only(tree)
    assert all(n.act_fmt is None and n.act_scale is None for n in _linears(s))
    assert len(_linears(s)) == 2 + 7
    assert np.asarray(s["float"]).tobytes() == np.asarray(tree["float"]).tobytes()
    assert _linears(tree)[0].act_fmt is not None  # pure: the input is unchanged
