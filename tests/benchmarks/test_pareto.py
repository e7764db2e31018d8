"""benchmarks/pareto.py: its rows checked against independent computations, its input errors.

One ``--tiny`` run (in process) with a second text; its JSON rows are checked: the bits per
weight of the W4A4 rows against the byte sizes in the safetensors headers of the checkpoint the
project writes for the same recipe, the ratios against ppl / float ppl, the W4A16 rows' recipe
choice. The methods said to store the same weights weight-only (``SAME_WEIGHTS``) are checked
to do so. Bad input (unknown method, missing or too-short text) is one line and status 2.
"""

from __future__ import annotations

import json
import re
import struct

import jax
import numpy as np
import pytest
from _bench_loader import load_benchmark

from arhq_jax.checkpoint.store import save
from arhq_jax.evaluation.pipeline import calibration_ids
from arhq_jax.linears.quantized import weights_only
from arhq_jax.models.config import PROJECTIONS
from arhq_jax.run.config import PRESETS, QuantConfig
from arhq_jax.run.quantize import quantize_model
from benchmarks import bench_tiny

pareto = load_benchmark("pareto")

PROJ_RE = re.compile(r"layers\.\d+\.\w+\.({})\.".format("|".join(PROJECTIONS)))
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pareto")
    text = tmp / "second.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc = pareto.main(["--tiny", "--out", str(tmp), "--second-text", str(text)])
    assert rc == 0
    doc = json.loads((tmp / "pareto.json").read_text())
    return tmp, doc


def _stored_projection_bytes(ckpt) -> dict[str, int]:
    """Bytes per tensor of the seven projections, read from the safetensors headers (model and
    LoRA adapter) of a checkpoint directory: data_offsets[1] − data_offsets[0]."""
    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        for name, v in header.items():
            if name != "__metadata__" and PROJ_RE.search(name):
                out[name] = v["data_offsets"][1] - v["data_offsets"][0]
    return out


def test_bits_per_weight_match_the_checkpoint_headers(run, tmp_path):
    _, doc = run
    m, corpus = bench_tiny.tiny_model(), bench_tiny.tiny_corpus()
    ids = calibration_ids(corpus.calib, bench_tiny.CALIB_TOKENS, bench_tiny.SEQ_LEN)
    n_weights = sum(
        int(np.prod(getattr(ly, p).w.shape)) for ly in m.params.layers for p in PROJECTIONS
    )
    checked = 0
    for name in ("rtn", "arhq r8"):
        four, w16 = (
            next(r for r in doc["rows"] if r["name"] == name and r["setting"] == s)
            for s in ("W4A4", "W4A16")
        )
        qcfg = QuantConfig.from_dict(four["config"])
        params = quantize_model(m.params, m.cfg, ids, qcfg, progress=False).params
        save(tmp_path / name, params, m.cfg, quant=qcfg.to_dict())
        sizes = _stored_projection_bytes(tmp_path / name)
        # codes, block scales, weight and input global scales (+ bf16 lora_A/B for ARHQ)
        assert four["bits"] == pytest.approx(8 * sum(sizes.values()) / n_weights, rel=1e-12)
        assert any("lora_A" in k for k in sizes) == (four["rank"] > 0)
        # served weight-only: the same checkpoint less its activation (input) global scales
        no_act = sum(v for k, v in sizes.items() if not k.endswith("input_global_scale"))
        assert w16["served"] == "W4A4 checkpoint"
        assert w16["bits"] == pytest.approx(8 * no_act / n_weights, rel=1e-12)
        checked += 1
    assert checked == 2


def test_ratios_and_scores_are_consistent(run):
    _, doc = run
    rows, meta = doc["rows"], doc["meta"]
    fl = [r for r in rows if r["name"] == "float"]
    assert {r["setting"] for r in fl} == {"W4A4", "W4A16"}
    fp, fp2 = fl[0]["ppl"], fl[0]["ppl2"]
    names = {(r["name"], r["setting"]) for r in rows}
    for n in ("rtn", "gptq", "arhq r4", "arhq r8"):
        assert {(n, "W4A4"), (n, "W4A16")} <= names
    for r in rows:
        assert r["ratio"] == pytest.approx(r["ppl"] / fp, rel=1e-12)
        assert r["ratio2"] == pytest.approx(r["ppl2"] / fp2, rel=1e-12)
        assert np.isfinite(r["ppl"]) and np.isfinite(r["ppl2"]) and r["kl"] >= 0
        if r["name"] != "float":  # a quantized model differs from the float one
            assert r["kl"] > 0 and r["kl2"] > 0 and 0 < r["top1"] < 1
            assert 4.5 <= r["bits"] < 32
    # GPTQ has a weight-only recipe whose weights depend on it: quantized again for W4A16
    g16 = next(r for r in rows if r["name"] == "gptq" and r["setting"] == "W4A16")
    assert g16["served"] == "weight-only recipe" and g16["config"]["act_fmt"] is None
    assert meta["eval_tokens"] == fl[0]["tokens"]
    assert meta["second_tokens"] == 2 * (bench_tiny.SEQ_LEN - 1)  # 2 chunks of the byte ids


def test_outputs_written(run):
    tmp, doc = run
    md = (tmp / "pareto.md").read_text()
    assert md.count("| arhq r8 |") == 3 and "× float²" in md  # the summary and both settings
    png = (tmp / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # --from-json rewrites the same table (and a plot) from the JSON alone
    again = tmp / "again"
    assert pareto.main(["--from-json", str(tmp / "pareto.json"), "--out", str(again)]) == 0
    assert (again / "pareto.md").read_text() == md
    assert (again / "pareto.png").read_bytes()[:8] == png[:8]


@pytest.mark.parametrize("method", sorted(pareto.SAME_WEIGHTS))
def test_same_weights_methods_store_the_same_weights_weight_only(method):
    """Their W4A16 point (the W4A4 checkpoint served weight-only) is exactly what quantizing
    them in the weight-only recipe stores: every leaf equal."""
    m, corpus = bench_tiny.tiny_model(), bench_tiny.tiny_corpus()
    ids = calibration_ids(corpus.calib, bench_tiny.CALIB_TOKENS, bench_tiny.SEQ_LEN)
    kw = dict(method=method, w_fmt="nvfp4", **({"rank": 4} if method == "svdquant" else {}))
    a = quantize_model(m.params, m.cfg, ids, QuantConfig(**kw, act_fmt="nvfp4"), progress=False)
    b = quantize_model(m.params, m.cfg, ids, QuantConfig(**kw, act_fmt=None), progress=False)
    la, lb = jax.tree.leaves(weights_only(a.params)), jax.tree.leaves(b.params)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_points_read_the_presets_from_run_config():
    pts = {p["name"]: p for p in pareto.points(list(PRESETS), [8], [8])}
    for name, recipe in PRESETS.items():
        given = pts[name]["w4a4"] or pts[name]["w4a16"]
        assert given == recipe
        assert (pts[name]["w4a4"] is None) == (QuantConfig(**recipe).act_fmt is None)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--only", "rtn,qlora"], "unknown method 'qlora'"),
        (["--second-text", "/nonexistent/text.txt"], "text file not found"),
        (["--arhq-ranks", "8,x"], "--arhq-ranks must be"),
        (["--second-text", "{short}"], "is too short"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, says, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    argv = ["--tiny", "--out", str(tmp_path)] + [a.replace("{short}", str(short)) for a in args]
    assert pareto.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pareto.py: error: ") and says in err, err
    assert not (tmp_path / "pareto.json").exists()
