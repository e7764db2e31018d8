"""``eval --json`` carries every field of the text line (the float ppl included), ``--results``
writes the same object atomically and never overwrites a file eval did not write, and a second
``eval`` takes the float reference from the cache with the same numbers."""

from __future__ import annotations

import json

import _tiny_cli as T
import pytest

import arhq_jax.cli.main as cli
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model
from converters import load_model


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    src = T.write_hf_dir(d / "hf")
    m = load_model(str(src))
    ids = m.tokenizer("\n".join(["def f(x):\n    return x"] * 40))["input_ids"][:256]
    qcfg = QuantConfig(method="rtn")
    q = quantize_model(m.params, m.cfg, [ids], qcfg, batch_size=1, progress=False).params
    out = d / "ck"
    source = {"model": str(src), "fingerprint": checkpoint.fingerprint(m.cfg, m.params)}
    checkpoint.save(out, q, m.cfg, quant=qcfg.to_dict(), tokenizer=m.tokenizer, source=source)
    return src, out


def _eval(src, out, *extra):
    return cli.main(["eval", "--model", str(src), "--quantized", str(out), "--seq-len", "64",
                     "--max-chunks", "3", *extra])  # fmt: skip


def test_json_results_and_cache(ck, tmp_path, capsys, monkeypatch):
    src, out = ck
    monkeypatch.setenv("ARHQ_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ARHQ_JAX_NO_CACHE", raising=False)
    res_file = tmp_path / "res.json"
    assert _eval(src, out, "--json", "--results", str(res_file)) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc == json.loads(res_file.read_text())
    assert doc["format"] == "arhq-jax-eval-results"
    assert doc["quantized"] == str(out) and doc["model"] == str(src)
    assert doc["tokens"] == 3 * 63 and doc["seq_len"] == 64 and doc["chunks"] == 3
    assert doc["kl"] > 0 and 0 <= doc["top1"] <= 1 and doc["weights_only"] is False
    assert doc["float_ppl"] > 1 and doc["float_reference"] == "computed"
    # the text line shows the same numbers
    assert _eval(src, out) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"ppl {doc['ppl']:.4f}" in line and f"float ppl {doc['float_ppl']:.4f} (cached)" in line
    # a second run: the float reference from the cache, identical numbers; the file replaced
    assert _eval(src, out, "--json", "--results", str(res_file)) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == {**doc, "float_reference": "cache"}
    assert json.loads(res_file.read_text()) == again
    monkeypatch.setenv("ARHQ_JAX_NO_CACHE", "1")
    assert _eval(src, out, "--json") == 0
    off = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert off == {**doc, "float_reference": "computed"}


def test_results_refuses_a_foreign_file_before_the_load(ck, tmp_path, capsys, monkeypatch):
    src, out = ck

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", refuse)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    assert _eval(src, out, "--results", str(foreign)) == 2
    err = capsys.readouterr().err
    assert "not written by arhq-jax eval; not overwriting it" in err and err.count("\n") == 1
    assert foreign.read_text() == '{"mine": 1}\n'
    assert _eval(src, out, "--results", str(tmp_path / "no" / "r.json")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "d.json").mkdir()
    assert _eval(src, out, "--results", str(tmp_path / "d.json")) == 2
    assert "not a regular file" in capsys.readouterr().err
