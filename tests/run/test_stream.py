"""Streaming quantization (``arhq_jax.run.stream``): disk to disk, one layer at a time, resumable.

The reference is the in-memory path, ``checkpoint.save(quantize_model(load_model(...)))``: the
streamed checkpoint must hold the same weight files byte for byte (same arrays, same order, same
shards) and the same config.json apart from the recipe's timings, for data-free, calibrated,
sequential and lm_head-quantizing recipes, tied and untied heads; a run killed after a layer and
rerun must give those same files; a foreign or different partial run is never resumed or removed.
"""

from __future__ import annotations

import hashlib
import json

import _tiny_cli as T
import jax
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.calibration.calibrate import LayerwiseRunner
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from arhq_jax.models.params import random_params
from arhq_jax.run import stream
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model
from converters import load_model, save_hf_dir
from converters.lazy import open_source

UNTIED = CFG.replace(tie_word_embeddings=False, num_layers=3)
RECIPES = {
    "rtn-w4a16": dict(method="rtn", act_fmt=None),  # data-free: no forward pass at all
    "rtn-w4a4": dict(method="rtn"),  # static activation scales: calibrated
    "arhq": dict(method="arhq", rank=4),
    "arhq-seq": dict(method="arhq", rank=4, sequential=True),
    "gptq": dict(method="gptq"),
    "awq": dict(method="awq"),  # sequential, and a quantized lm_head (the method's finish)
}
QUANT = {"note": "test"}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """bf16 HF directories of the tiny model, tied (2 layers) and untied (3 layers)."""
    out = {}
    for name, cfg in (("tied", CFG), ("untied", UNTIED)):
        bf = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
        params = random_params(bf, jax.random.key(3), std=0.08)
        out[name] = save_hf_dir(bf, params, tmp_path_factory.mktemp("src") / name)
    return out


@pytest.fixture(scope="module")
def ids():
    return np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)


def _in_memory(path, qcfg, ids, out):
    m = load_model(path, tokenizer=False)
    res = quantize_model(m.params, m.cfg, ids, qcfg, batch_size=4, progress=False)
    source = {"model": "tiny", "fingerprint": checkpoint.fingerprint(m.cfg, m.params)}
    checkpoint.save(out, res.params, m.cfg, quant=QUANT, source=source, max_shard_bytes=60_000)


def _streamed(path, qcfg, ids, out, **kw):
    with open_source(path) as src:
        return stream.quantize_stream(
            src,
            ids,
            qcfg,
            out,
            quant=QUANT,
            source={"model": "tiny"},
            batch_size=4,
            progress=False,
            max_shard_bytes=60_000,
            **kw,
        )


def _digests(d):
    """sha256 of every file but config.json / manifest.json (which hold the timings)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name not in ("config.json", "manifest.json")
    }


def _config(d):
    hf = json.loads((d / "config.json").read_text())
    hf["arhq_jax"]["recipe"] = {
        k: v for k, v in hf["arhq_jax"]["recipe"].items() if k not in ("timings", "calib_tokens")
    }
    return hf


def _same(a, b):
    da, db = _digests(a), _digests(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert da[k] == db[k], k
    assert _config(a) == _config(b)


@pytest.mark.parametrize(
    "recipe,head",
    [("rtn-w4a16", "untied"), ("rtn-w4a4", "tied"), ("arhq", "untied"), ("arhq-seq", "tied")]
    + [("gptq", "tied"), ("awq", "untied")],
)
def test_streamed_equals_in_memory(sources, ids, tmp_path, recipe, head):
    qcfg = QuantConfig(**RECIPES[recipe])
    _in_memory(sources[head], qcfg, ids, tmp_path / "mem")
    res = _streamed(sources[head], qcfg, ids, tmp_path / "str")
    _same(tmp_path / "mem", tmp_path / "str")
    assert res.resumed_from == 0 and res.projections
    assert not stream.work_dir(tmp_path / "str").exists()
    # Several shards (the copy of the big dense tensors in row blocks crosses shard limits too).
    assert (tmp_path / "str" / "model.safetensors.index.json").is_file()
    loaded, cfg, _ = checkpoint.load(tmp_path / "str")
    assert cfg.num_layers == len(loaded.layers)


@pytest.mark.parametrize("recipe", ["arhq", "arhq-seq"])
def test_hidden_states_on_the_host_give_the_same_checkpoint(sources, ids, tmp_path, recipe):
    """``hidden_on_host``: the hidden states wait in host memory between layers, one batch on
    the device at a time; the checkpoint is the in-memory one, byte for byte."""
    qcfg = QuantConfig(**RECIPES[recipe])
    _in_memory(sources["tied"], qcfg, ids, tmp_path / "mem")
    _streamed(sources["tied"], qcfg, ids, tmp_path / "host", hidden_on_host=True)
    _same(tmp_path / "mem", tmp_path / "host")
    m = load_model(sources["tied"], tokenizer=False)
    runner = LayerwiseRunner(m.params, m.cfg, ids, batch_size=4, hidden_on_host=True)
    runner.advance(m.params.layers[0])
    assert all(isinstance(h, np.ndarray) for h, _ in runner.batches())


def test_fingerprint_from_the_files_equals_the_loaded_params(sources):
    m = load_model(sources["untied"], tokenizer=False)
    with open_source(sources["untied"]) as src:
        assert checkpoint.fingerprint_of(src.cfg, src.fingerprint_samples()) == (
            checkpoint.fingerprint(m.cfg, m.params)
        )


@pytest.mark.parametrize("recipe", ["arhq-seq", "rtn-w4a16", "arhq"])
def test_killed_run_resumes_to_the_same_checkpoint(sources, ids, tmp_path, recipe):
    qcfg = QuantConfig(**RECIPES[recipe])
    _in_memory(sources["untied"], qcfg, ids, tmp_path / "ref")

    def kill_after_1(i):
        if i == 1:
            raise Killed

    out = tmp_path / "out"
    with pytest.raises(Killed):
        _streamed(sources["untied"], qcfg, ids, out, on_layer=kill_after_1)
    work = stream.work_dir(out)
    assert json.loads((work / "state.json").read_text())["done"] == 2
    assert not out.exists()
    seen = []
    res = _streamed(sources["untied"], qcfg, ids, out, on_layer=seen.append)
    assert res.resumed_from == 2 and seen == [2]
    _same(tmp_path / "ref", out)
    assert not work.exists()


def test_another_recipe_does_not_resume_a_partial_run(sources, ids, tmp_path):
    out = tmp_path / "out"

    def kill(i):
        raise Killed

    with pytest.raises(Killed):
        _streamed(sources["tied"], QuantConfig(method="rtn", act_fmt=None), ids, out, on_layer=kill)
    state = (stream.work_dir(out) / "state.json").read_text()
    with pytest.raises(ValueError, match="partial run of another recipe"):
        _streamed(sources["tied"], QuantConfig(method="arhq", rank=4), ids, out)
    assert (stream.work_dir(out) / "state.json").read_text() == state  # untouched


def test_a_foreign_work_directory_is_refused_and_kept(sources, ids, tmp_path):
    out = tmp_path / "out"
    work = stream.work_dir(out)
    work.mkdir()
    (work / "mine.txt").write_text("not arhq-jax's")
    with pytest.raises(FileExistsError, match="not an arhq-jax resume directory"):
        _streamed(sources["tied"], QuantConfig(method="rtn", act_fmt=None), ids, out)
    assert (work / "mine.txt").read_text() == "not arhq-jax's"


def test_whole_model_recipes_do_not_stream(sources, ids, tmp_path):
    with pytest.raises(ValueError, match="whole model"):
        _streamed(sources["tied"], QuantConfig(method="resq"), ids, tmp_path / "out")
    assert not stream.work_dir(tmp_path / "out").exists()


def test_gguf_source_reads_what_load_model_loads(smollm2):
    """The packaged SmolLM2 GGUF (Q4_1, dequantized per tensor): same layers, embedding rows,
    final norm and fingerprint as the loaded model."""
    m = smollm2
    with open_source("smollm2") as src:
        assert src.cfg == m.cfg
        last = m.cfg.num_layers - 1
        for i in (0, last):
            got, want = jax.tree.leaves(src.layer(i)), jax.tree.leaves(m.params.layers[i])
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        rows = np.array([[0, 5, 5], [m.cfg.vocab_size - 1, 2, 3]])
        np.testing.assert_array_equal(src.embed_rows(rows), np.asarray(m.params.embed)[rows])
        np.testing.assert_array_equal(np.asarray(src.final_norm()), m.params.final_norm)
        fp = checkpoint.fingerprint_of(src.cfg, src.fingerprint_samples())
    assert fp == checkpoint.fingerprint(m.cfg, m.params)


def test_cli_streams_resumes_and_falls_back(tmp_path, capsys):
    """``arhq-jax quantize``: a killed streamed run leaves its work directory and the same command
    finishes it (same weight files as a fresh run); a whole-model recipe (the rank budget) says in
    one line that it loads the model in memory, and still writes a loadable checkpoint."""
    model = T.write_hf_dir(tmp_path / "model")
    args = ["quantize", "--model", str(model), "--calib-tokens", "256", "--calib-seq-len", "64"]
    arhq = [*args, "--method", "arhq", "--rank", "4"]
    assert main([*arhq, "--out", str(tmp_path / "fresh")]) == 0
    out = tmp_path / "out"
    real = stream._write_layer
    calls = []

    def dies_on_layer_1(work, i, layer):
        calls.append(i)
        if i == 1:
            raise Killed
        return real(work, i, layer)

    stream._write_layer = dies_on_layer_1
    try:
        with pytest.raises(Killed):
            main([*arhq, "--out", str(out)])
    finally:
        stream._write_layer = real
    assert calls == [0, 1] and stream.work_dir(out).is_dir()
    capsys.readouterr()
    assert main([*arhq, "--out", str(out)]) == 0
    assert "resumed a killed run after its layer 0" in capsys.readouterr().out
    assert _digests(out) == _digests(tmp_path / "fresh")
    assert main([*arhq, "--rank-budget", "--out", str(tmp_path / "budget")]) == 0
    err = capsys.readouterr().err
    assert "loaded in memory, not streamed" in err
    checkpoint.load(tmp_path / "budget")
