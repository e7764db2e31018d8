"""The one-call API (``arhq_jax/api.py``): ``arhq_jax.quantize`` / ``arhq_jax.load`` against the
CLI, on the tiny HF model of ``_tiny_cli`` (2 layers, a 300-token BPE tokenizer).

- The CLI with flags, the CLI with a recipe file, the API with keywords, with a recipe file and
  with an already-loaded model (the in-memory path) write the same files, byte for byte.
- A calibration file in each format (.txt, .jsonl, .parquet) gives the statistics of the same
  text given as a plain ``--calib-text`` file: the quantized models are bit-identical (within
  this run), and a different text gives a different model.
- Per-module recipes: an ignored projection is the source's float weight, untouched, and is
  listed in compressed-tensors' ``ignore``; an overridden projection is the one a whole-model
  run in that format makes, and every other projection the one of the plain recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import _tiny_cli as T
import jax
import numpy as np
import pytest

import arhq_jax
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from converters import load_model

FLAGS = ["--method", "arhq", "--rank", "4", "--calib-tokens", "256", "--calib-seq-len", "64"]
KW = dict(method="arhq", rank=4, calib_tokens=256, calib_seq_len=64)
RECIPE = "method: arhq\nrank: 4\ncalib-tokens: 256\ncalib-seq-len: 64\n"


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    T.write_hf_dir(d / "hf")
    return d


# What records how the run was started (the command line or the Python call, the output's name)
# and so differs between the CLI and the API; the manifest is compared without their entries.
PROVENANCE = ("provenance.json", "README.md")


def digests(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names), the provenance files left out and
    the manifest hashed without their entries."""
    out = {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name not in PROVENANCE + ("manifest.json",)
    }
    manifest = json.loads((path / "manifest.json").read_text())
    out["manifest.json"] = hashlib.sha256(
        json.dumps(_without(manifest, PROVENANCE), sort_keys=True).encode()
    ).hexdigest()
    return out


def _without(doc, names):
    """``doc`` with every dict key in ``names`` removed, recursively."""
    if isinstance(doc, dict):
        return {k: _without(v, names) for k, v in doc.items() if k not in names}
    if isinstance(doc, list):
        return [_without(v, names) for v in doc]
    return doc


@pytest.fixture(scope="module")
def cli_ckpt(d):
    out = d / "cli"
    argv = [
        "quantize",
        "--model",
        d / "hf",
        *FLAGS,
        "--out",
        out,
        "--save-recipe",
        d / "saved.yaml",
    ]
    assert main([str(a) for a in argv]) == 0
    return out


def test_api_and_recipe_files_reproduce_the_cli_checkpoint(d, cli_ckpt, capsys):
    ref = digests(cli_ckpt)
    assert {
        "config.json",
        "manifest.json",
        "model.safetensors",
        "lora/adapter_model.safetensors",
    } <= set(ref)
    hand = d / "hand.yaml"
    hand.write_text(RECIPE)
    assert (
        main(["quantize", "--model", str(d / "hf"), "--recipe", str(hand), "--out", str(d / "c2")])
        == 0
    )
    assert digests(d / "c2") == ref
    hf = str(d / "hf")
    m = arhq_jax.quantize(hf, out=d / "a1", progress=False, **KW)
    assert digests(d / "a1") == ref
    arhq_jax.quantize(hf, recipe=d / "saved.yaml", out=d / "a2", progress=False)
    assert digests(d / "a2") == ref
    arhq_jax.quantize(hf, recipe=RECIPE_DICT, out=d / "a3", progress=False)
    assert digests(d / "a3") == ref
    # an already-loaded model: quantized in memory and saved (no streaming), the same bytes
    loaded = load_model(hf)
    m2 = arhq_jax.quantize(loaded, recipe=hand, out=d / "a4", progress=False)
    assert digests(d / "a4") == ref
    # the returned model is the checkpoint's
    back = arhq_jax.load(d / "a1")
    for a, b, c in zip(*(jax.tree.leaves(x.params) for x in (m, m2, back)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    assert m.recipe.rank == 4 and back.recipe["rank"] == 4 and m.calib_tokens == 256
    # the saved recipe is the resolved one and is what --recipe read back
    saved = (d / "saved.yaml").read_text()
    assert saved.startswith(f"# arhq-jax {arhq_jax.__version__} recipe\n")
    assert (
        "act-format: nvfp4\n" in saved and "rank: 4\n" in saved and "calib-tokens: 256\n" in saved
    )


RECIPE_DICT = {"method": "arhq", "rank": 4, "calib-tokens": 256, "calib_seq_len": 64}


def test_load_evaluates_and_generates_as_the_cli_does(d, cli_ckpt, capsys):
    m = arhq_jax.load(cli_ckpt, model=str(d / "hf"))
    got = m.evaluate(reference=str(d / "hf"), seq_len=64, max_chunks=2)
    capsys.readouterr()
    argv = ["eval", "--model", str(d / "hf"), "--quantized", str(cli_ckpt)]
    assert main([*argv, "--seq-len", "64", "--max-chunks", "2", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the CLI's line also names the run (format, text, chunks...): the measured fields agree
    shared = set(got) & set(cli)
    assert shared >= {"ppl", "kl", "top1", "float_ppl"}
    assert {k: got[k] for k in shared} == {k: cli[k] for k in shared}
    assert got["float_ppl"] > 1 and got["kl"] > 0
    alone = m.evaluate(seq_len=64, max_chunks=2)
    assert alone == {"ppl": got["ppl"], "tokens": got["tokens"]}
    text = m.generate("def f(x):", 6)
    gen = ["generate", "--model", str(d / "hf"), "--quantized", str(cli_ckpt)]
    assert main([*gen, "--prompt", "def f(x):", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == text + "\n"
    from converters import save_hf_dir

    other = save_hf_dir(T.config(), T.params(T.config(), seed=9), d / "other", tokenizer=None)
    with pytest.raises(ValueError, match="was made from another model"):
        arhq_jax.load(cli_ckpt, model=str(other))


def _texts(tmp_path):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    docs = text[:40_000].split("\n\n")
    other = text[40_000:80_000]
    return docs, other


def test_calibration_files_give_the_statistics_of_the_same_plain_text(d):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs, other = _texts(d)
    (d / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in docs))
    pq.write_table(pa.table({"text": docs}), d / "c.parquet")
    (d / "other.txt").write_text(other, encoding="utf-8")
    hf = str(d / "hf")
    plain = arhq_jax.quantize(hf, calib_text=str(d / "c.txt"), progress=False, **KW)
    ref = [np.asarray(x) for x in jax.tree.leaves(plain.params)]
    for f in ("c.txt", "c.jsonl", "c.parquet"):
        m = arhq_jax.quantize(hf, calibration=str(d / f), progress=False, **KW)
        got = [np.asarray(x) for x in jax.tree.leaves(m.params)]
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f)
        assert m.diagnostics == plain.diagnostics, f
    m = arhq_jax.quantize(hf, calibration=str(d / "other.txt"), progress=False, **KW)
    assert m.diagnostics != plain.diagnostics
    diff = [
        not np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(m.params), ref, strict=True)
    ]
    assert any(diff)


def _proj(params, li, p):
    return getattr(params.layers[li], p)


def test_ignore_and_overrides_reach_the_checkpoint(d, cli_ckpt):
    hf = str(d / "hf")
    rec = d / "mixed.yaml"
    rec.write_text(
        RECIPE + "ignore: ['layers.0.self_attn.*']\n"
        "overrides:\n  - {match: 'layers.1.mlp.*', format: mxfp4}\n"
    )
    assert main(["quantize", "--model", hf, "--recipe", str(rec), "--out", str(d / "mixed")]) == 0
    api = arhq_jax.quantize(
        hf,
        out=d / "mixed-api",
        progress=False,
        ignore=["layers.0.self_attn.*"],
        overrides=[{"match": "layers.1.mlp.*", "format": "mxfp4"}],
        **KW,
    )
    assert digests(d / "mixed-api") == digests(d / "mixed")
    hfcfg = json.loads((d / "mixed" / "config.json").read_text())
    assert hfcfg["arhq_jax"]["recipe"]["ignore"] == ["layers.0.self_attn.*"]
    assert hfcfg["arhq_jax"]["recipe"]["overrides"] == [
        {"match": "layers.1.mlp.*", "format": "mxfp4"}
    ]
    mods = hfcfg["arhq_jax"]["modules"]
    assert mods["model.layers.0.self_attn.q_proj"]["kind"] == "dense"
    gate = mods["model.layers.1.mlp.gate_proj"]  # arhq-jax's own layout: its format recorded
    assert gate["kind"] == "quant" and '"name": "mxfp4"' in json.dumps(gate)
    assert api.params.layers[1].gate_proj.w.spec.name == "mxfp4"
    assert api.params.layers[0].gate_proj.w.spec.name == "nvfp4"
    assert mods["model.layers.1.self_attn.q_proj"]["kind"] == "ct-nvfp4"
    assert hfcfg["quantization_config"]["quant_method"] == "arhq-jax"

    float_params = load_model(hf).params
    nv = checkpoint.load(cli_ckpt)[0]
    mx = arhq_jax.quantize(hf, format="mxfp4", progress=False, **KW).params
    got = api.params
    for li in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            if li == 0 and p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                want = _proj(float_params, li, p)  # untouched float weight
            elif li == 1 and p in ("gate_proj", "up_proj", "down_proj"):
                want = _proj(mx, li, p)
            else:
                want = _proj(nv, li, p)
            a, b = jax.tree.leaves(_proj(got, li, p)), jax.tree.leaves(want)
            assert type(_proj(got, li, p)) is type(want), (li, p)
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{li} {p}")

    # ignore alone keeps compressed-tensors' layout and lists the float projections there
    api = arhq_jax.quantize(hf, out=d / "ign", progress=False, ignore=["*.down_proj"], **KW)
    qc = json.loads((d / "ign" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} <= set(qc["ignore"])


def test_bad_settings_fail_before_the_model_loads(d, tmp_path):
    missing = str(tmp_path / "no-model")
    with pytest.raises(ValueError, match=r"quantize\(\): unknown key 'rnak'"):
        arhq_jax.quantize(missing, rnak=4)
    with pytest.raises(ValueError, match="quantize\\(\\): key 'rank': must be >= 0"):
        arhq_jax.quantize(missing, rank=-1)
    with pytest.raises(ValueError, match="give pydoc, wikitext2, c4"):
        arhq_jax.quantize(missing, calibration="data.csv")
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        arhq_jax.quantize(missing, calibration=str(tmp_path / "none.jsonl"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an arhq-jax checkpoint; not replacing it"):
        arhq_jax.quantize(missing, out=foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="needs cfg= and tokenizer="):
        arhq_jax.quantize(load_model(str(d / "hf")).params)
    with pytest.raises(ValueError, match="the model's tokenizer has no chat template"):
        txt = tmp_path / "t.txt"
        txt.write_text("def f(x): return x\n" * 200)
        arhq_jax.quantize(str(d / "hf"), calibration=str(txt), chat_template=True, **KW)


def test_cli_errors_of_the_new_flags_are_one_line(d, tmp_path, capsys):
    hf = str(d / "hf")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 4\nformat: nvfp5\n")
    for argv, needle in (
        (["--recipe", str(bad)], f"recipe {bad}: key 'format': expected one of"),
        (["--recipe", str(tmp_path / "none.yaml")], "recipe not found"),
        (["--calib-dataset", "a.csv"], "give pydoc, wikitext2, c4"),
        (["--calib-dataset", "pydoc", "--chat-template"], "does not apply to the pydoc corpus"),
        (["--save-recipe", str(bad)], "exists; give a new file name"),
        (["--chat-template"], "--chat-template needs --calib-dataset"),
    ):
        rc = main(["quantize", "--model", hf, *argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("arhq-jax quantize: error: ") and needle in err[-1], (
            err
        )
        assert not (tmp_path / "o").exists()
    assert bad.read_text() == "rank: 4\nformat: nvfp5\n"


def test_version_and_a_side_effect_free_import(capsys):
    import importlib.metadata

    assert arhq_jax.__version__ == importlib.metadata.version("arhq-jax")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"arhq-jax {arhq_jax.__version__}\n"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = (
        "import os, sys, arhq_jax; "
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), 'jax' in sys.modules, "
        "callable(arhq_jax.quantize), 'jax' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    # nothing set, jax not imported by the package itself; the API loads on first use
    assert out == ["None", "False", "True", "True"]
