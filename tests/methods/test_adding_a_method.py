"""The worked example of docs/architecture.md ("Adding a method") runs as written.

The doc's file is executed as a module, registered with the doc's one line, and then used through
``QuantConfig``, ``quantize_model``, the CLI parser and the checkpoint; it is checked against an
independent numpy clip + ``fake_quant`` of every weight.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli import main as cli
from arhq_jax.methods import REGISTRY
from arhq_jax.models.config import PROJECTIONS
from arhq_jax.numerics.formats import fake_quant
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _block(tag: str) -> str:
    m = re.search(rf"<!-- example:{tag} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"example {tag} not found in {DOC}"
    return m.group(1)


@pytest.fixture
def clip_rtn():
    mod = types.ModuleType("arhq_jax.methods.clip_rtn")
    sys.modules[mod.__name__] = mod  # dataclasses resolve annotations through it
    try:
        exec(compile(_block("clip_rtn"), "docs/architecture.md:clip_rtn", "exec"), mod.__dict__)
        exec(_block("register"), {"REGISTRY": REGISTRY, "ClipRTN": mod.ClipRTN})
        yield mod
    finally:
        if "clip-rtn" in REGISTRY:
            REGISTRY.unregister("clip-rtn")
        del sys.modules[mod.__name__]


def test_worked_example_is_a_working_method(clip_rtn, model, tmp_path):
    params, ids = model
    qcfg = QuantConfig(method="clip-rtn", clip=0.5)
    assert qcfg.w_fmt == "int4" and qcfg.act_fmt is None and qcfg.group_size == -1
    res = quantize_model(params, CFG, None, qcfg, progress=False)  # data-free
    assert res.calib_tokens == 0
    for fp, q in zip(params.layers, res.params.layers, strict=True):
        for p in PROJECTIONS:
            w = np.asarray(getattr(fp, p).w, np.float64)
            bound = 0.5 * np.abs(w).max(axis=1, keepdims=True)
            want = fake_quant(np.clip(w, -bound, bound).astype(np.float32), "int4", group_size=-1)
            got = getattr(q, p)(
                np.eye(CFG.hidden_size if p != "down_proj" else 96, dtype=np.float32)
            )
            np.testing.assert_array_equal(np.asarray(got).T, np.asarray(want))
    # clip = 1 is plain RTN, bit for bit.
    plain = quantize_model(params, CFG, None, QuantConfig(method="clip-rtn"), progress=False)
    rtn = QuantConfig(method="rtn", w_fmt="int4", act_fmt=None, group_size=-1)
    ref = quantize_model(params, CFG, ids, rtn, progress=False)
    a, b = plain.params.layers[0].q_proj.w, ref.params.layers[0].q_proj.w
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))
    # Options belong to their method; the CLI flag is generated; checkpoints round-trip.
    with pytest.raises(ValueError, match="option rank does not apply to clip-rtn"):
        QuantConfig(method="clip-rtn", rank=8)
    with pytest.raises(ValueError, match="option clip does not apply to arhq"):
        QuantConfig(method="arhq", clip=0.5)
    args = cli.build_parser().parse_args(
        ["quantize", "--method", "clip-rtn", "--clip", "0.5", "--out", "x"]
    )
    assert args.clip == 0.5
    out = tmp_path / "ckpt"
    checkpoint.save(out, res.params, CFG, quant=qcfg.to_dict())
    loaded, _, recipe = checkpoint.load(out)
    assert QuantConfig.from_dict(recipe) == qcfg
    x = np.asarray(np.random.default_rng(0).normal(size=(3, CFG.hidden_size)), np.float32)
    np.testing.assert_array_equal(
        np.asarray(loaded.layers[1].o_proj(x)), np.asarray(res.params.layers[1].o_proj(x))
    )
