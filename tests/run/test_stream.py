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
import shutil
import subprocess
import sys

import _tiny_cli as T
import jax
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.calibration.calibrate import LayerwiseRunner
from arhq_jax.checkpoint import out_dir
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from arhq_jax.models.params import random_params
from arhq_jax.run import stream
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model
from converters import load_model, save_hf_dir
from converters.lazy import open_source
from converters.safetensors_io import SafetensorsReader, write_safetensors

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
    """sha256 of every file but config.json / manifest.json (the in-memory and streamed paths
    record their calibration differently there; see ``_config``)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name not in ("config.json", "manifest.json")
    }


def _all_bytes(d):
    """{relative path: bytes} of every file of a directory."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


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
    # The resumed directory is the uninterrupted run's, every byte of every file (config.json and
    # manifest.json included: no run timings are stored in the checkpoint).
    _streamed(sources["untied"], qcfg, ids, tmp_path / "whole")
    assert _all_bytes(out) == _all_bytes(tmp_path / "whole")


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
    # provenance.json and the model card record the command, whose --out differs
    fresh, invocation = tmp_path / "fresh", ("provenance.json", "README.md")
    got, want = _digests(out), _digests(fresh)
    assert {k: v for k, v in got.items() if k not in invocation} == {
        k: v for k, v in want.items() if k not in invocation
    }
    assert "diagnostics.json" in got
    for f in invocation:
        a = (out / f).read_text().replace(str(out), "OUT").replace("# out\n", "# OUT\n")
        b = (fresh / f).read_text().replace(str(fresh), "OUT").replace("# fresh\n", "# OUT\n")
        assert a == b, f
    assert main([*arhq, "--rank-budget", "--out", str(tmp_path / "budget")]) == 0
    err = capsys.readouterr().err
    assert "loaded in memory, not streamed" in err
    checkpoint.load(tmp_path / "budget")


# ------------------------------------------------------------------ a resume verifies its files

KILLED = {"data-free": "rtn-w4a16", "calibrated": "rtn-w4a4"}


@pytest.fixture(scope="module")
def killed(sources, ids, tmp_path_factory):
    """Work directories of runs killed after layer 1 of 3 (2 layers done), data-free and
    calibrated (these hold the hidden states entering layer 2); tests resume copies of them."""
    out = {}
    for name, recipe in KILLED.items():
        d = tmp_path_factory.mktemp("killed") / "out"

        def kill_after_1(i):
            if i == 1:
                raise Killed

        with pytest.raises(Killed):
            _streamed(
                sources["untied"], QuantConfig(**RECIPES[recipe]), ids, d, on_layer=kill_after_1
            )
        out[name] = stream.work_dir(d)
    return out


def _copy_work(killed, name, tmp_path):
    """A copy of a killed run's work directory beside ``tmp_path / 'out'``; the output path."""
    out = tmp_path / "out"
    shutil.copytree(killed[name], stream.work_dir(out), symlinks=True)
    return out


def _resume(sources, ids, name, out, **kw):
    return _streamed(sources["untied"], QuantConfig(**RECIPES[KILLED[name]]), ids, out, **kw)


def _files(d):
    return {
        p.name: "link" if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
        for p in d.iterdir()
    }


def _refused(sources, ids, name, out, *needles):
    """Resuming ``out`` raises ResumeError naming every needle and how to start over; nothing
    in the work directory changed, no checkpoint appeared."""
    work = stream.work_dir(out)
    before = _files(work)
    with pytest.raises(stream.ResumeError) as e:
        _resume(sources, ids, name, out)
    msg = str(e.value)
    for n in (str(work), "remove the directory to start over", *needles):
        assert n in msg, msg
    assert "\n" not in msg
    assert _files(work) == before and not out.exists()
    return msg


def test_the_copied_killed_run_resumes(sources, ids, killed, tmp_path):
    """The baseline of the refusals below: the unchanged copy resumes after layer 1."""
    for name in KILLED:
        out = _copy_work(killed, name, tmp_path / name)
        assert _resume(sources, ids, name, out).resumed_from == 2
        checkpoint.load(out)


def test_an_edited_layer_file_is_refused(sources, ids, killed, tmp_path):
    """layer-00000 rewritten with a norm set to 7.0: same names, shapes, size; only its bytes
    differ from the sha256 recorded when it was written."""
    out = _copy_work(killed, "data-free", tmp_path)
    f = stream.work_dir(out) / "layer-00000.safetensors"
    with SafetensorsReader([f]) as r:
        tensors = [(n, r.get(n).copy()) for n in r.names()]
    norm = "model.layers.0.input_layernorm.weight"
    tensors = [(n, np.full_like(a, 7.0) if n == norm else a) for n, a in tensors]
    size = f.stat().st_size
    write_safetensors(f, tensors)
    assert f.stat().st_size == size
    _refused(sources, ids, "data-free", out, "layer-00000.safetensors (layer 0)", "sha256")


def test_hidden_states_times_1000_are_refused(sources, ids, killed, tmp_path):
    out = _copy_work(killed, "calibrated", tmp_path)
    f = stream.work_dir(out) / "hidden-00002.safetensors"
    with SafetensorsReader([f]) as r:
        tensors = [(n, r.get(n) * 1000) for n in r.names()]
    write_safetensors(f, tensors)
    _refused(sources, ids, "calibrated", out, "hidden states entering layer 2", "sha256")


def test_symlinks_and_foreign_files_are_refused(sources, ids, killed, tmp_path):
    out = _copy_work(killed, "data-free", tmp_path)
    work = stream.work_dir(out)
    # a symlink to an identical copy elsewhere: the bytes would verify, the link does not
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(work / "layer-00001.safetensors", elsewhere)
    (work / "layer-00001.safetensors").unlink()
    (work / "layer-00001.safetensors").symlink_to(elsewhere)
    _refused(sources, ids, "data-free", out, "layer-00001.safetensors is a symbolic link")
    (work / "layer-00001.safetensors").unlink()
    shutil.copy(elsewhere, work / "layer-00001.safetensors")
    for foreign in ("notes.txt", "layer-1.safetensors", "sub"):
        p = work / foreign
        p.mkdir() if foreign == "sub" else p.write_text("mine")
        _refused(sources, ids, "data-free", out, f"holds {foreign!r}, which arhq-jax did not write")
        p.rmdir() if foreign == "sub" else p.unlink()
    assert _resume(sources, ids, "data-free", out).resumed_from == 2  # restored: resumes


def _extra_name(st):
    st["layers"][1][-1][3].append("model.layers.1.mlp.down_proj.extra")


def _extra_file_tensor(st):  # a name the file does not hold, in place of one it does
    st["layers"][0][-1][3][0] = "model.layers.0.mlp.down_proj.other"


def _entry_kind(st):
    st["layers"][0][2][2]["kind"] = "evil-kind"


def _entry_extra_key(st):
    st["layers"][0][2][2]["code"] = "os:system"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (_extra_name, "layer 1's record"),
        (_extra_file_tensor, "layer 0's record"),
        (_entry_kind, "layer 0's record"),
        (_entry_extra_key, "layer 0's record"),
        (lambda st: st["layers"][0].pop(0), "layer 0's record: expected a list of"),
        (lambda st: st["layers"].__setitem__(1, {"a": 1}), "layer 1's record"),
        (lambda st: st["layers"][0].__setitem__(0, ["tensor", "x"]), "layer 0's record"),
        (lambda st: st.__setitem__("done", "2"), "'done' must be an integer"),
        (lambda st: st.__setitem__("done", 9), "'done' 9 is not in [0, 3]"),
        (lambda st: st.__setitem__("done", 3), "'layers' must be a list of 3 records"),
        (lambda st: st.pop("timings"), "missing keys ['timings']"),
        (lambda st: st.__setitem__("evil", 1), "unexpected keys ['evil']"),
        (lambda st: st["timings"].__setitem__("packing_s", "x"), "'timings' must map"),
        (lambda st: st["files"].pop("layer-00001.safetensors"), "no sha256 recorded for layer 1"),
        (lambda st: st["files"].__setitem__("../x", "0" * 64), "bad 'files' entry '../x'"),
        (lambda st: st["files"].__setitem__("layer-00000.safetensors", "0" * 64), "sha256"),
    ],
)
def test_state_records_are_validated(sources, ids, killed, tmp_path, mutate, needle):
    out = _copy_work(killed, "data-free", tmp_path)
    f = stream.work_dir(out) / "state.json"
    st = json.loads(f.read_text())
    mutate(st)
    f.write_text(json.dumps(st))
    _refused(sources, ids, "data-free", out, needle)


def test_a_stale_pid_reused_by_another_process_does_not_block(sources, ids, killed, tmp_path):
    """The writer's pid now belongs to another live process: its start time differs from the
    recorded one, so the writer is dead and the run resumes; with the recorded start time equal,
    it is a running writer and the directory is refused."""
    out = _copy_work(killed, "data-free", tmp_path)
    f = stream.work_dir(out) / "state.json"
    st = json.loads(f.read_text())
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            start = out_dir.process_start(other.pid)
            if start is None:
                pytest.skip("no /proc/<pid>/stat on this system")
            f.write_text(json.dumps({**st, "pid": other.pid, "pid_start": start}))
            with pytest.raises(ValueError, match=f"in use by a running quantize .pid {other.pid}"):
                _resume(sources, ids, "data-free", out)
            f.write_text(json.dumps({**st, "pid": other.pid, "pid_start": start - 1}))
            assert _resume(sources, ids, "data-free", out).resumed_from == 2
        finally:
            other.kill()
