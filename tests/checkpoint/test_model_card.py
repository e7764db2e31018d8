"""Provenance, diagnostics, generation config and the model card of a checkpoint: written, listed
in the manifest (a changed card fails the integrity check like any file), and read back by
transformers' and peft's own loaders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import version

import numpy as np
import pytest
from _tiny import CFG

import arhq_jax.checkpoint.model_card as model_card
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.checkpoint.store import CheckpointError, check_directory
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

# θ 1e5 (transformers 4.x falls back to 10000 without a top-level rope_theta), real bos/eos ids.
CFG5 = dataclasses.replace(CFG, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
COMMAND = ["arhq-jax", "quantize", "--model", "some/source", "--out", "ckpt/tiny card"]


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """An ARHQ r4 W4A4 checkpoint saved with a card: ``(dir, QuantizeResult, qcfg)``."""
    params, ids = model
    qcfg = QuantConfig(method="arhq", rank=4)
    r = quantize_model(params, CFG5, ids, qcfg, batch_size=8, progress=False)
    out = tmp_path_factory.mktemp("card") / "ck"
    card = model_card.Card(command=COMMAND, preset=None, diagnostics=r.projections)
    source = {"model": "some/source", "fingerprint": checkpoint.fingerprint(CFG5, params)}
    checkpoint.save(out, r.params, CFG5, quant=qcfg.to_dict(), source=source, card=card)
    return out, r, qcfg


def test_card_files_are_written_and_listed_in_the_manifest(written):
    out, _, _ = written
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for name in ("README.md", "provenance.json", "diagnostics.json", "generation_config.json"):
        data = (out / name).read_bytes()
        assert manifest[name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    check_directory(out)  # the directory is still wholly ours
    checkpoint.check_out(out)  # and may be replaced by a rerun
    checkpoint.load(out)


def test_provenance_records_version_recipe_and_command(written):
    out, _, qcfg = written
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["arhq_jax_version"] == version("arhq-jax")
    assert prov["command"] == COMMAND
    assert prov["preset"] is None
    assert prov["recipe"] == qcfg.to_dict()
    assert QuantConfig.from_dict(prov["recipe"]) == qcfg
    assert prov["source"]["model"] == "some/source"
    card = (out / "README.md").read_text()
    assert "arhq-jax quantize --model some/source --out 'ckpt/tiny card'" in card
    assert "method=arhq" in card and "rank=4" in card


def test_changed_card_fails_the_integrity_check_and_is_never_replaced(written, tmp_path):
    import shutil

    out, _, _ = written
    mine = tmp_path / "ck"
    shutil.copytree(out, mine)
    card = mine / "README.md"
    card.write_text(card.read_text() + "\nMy notes.\n")
    with pytest.raises(CheckpointError, match=r"README.md: .*(sha256|bytes)"):
        check_directory(mine)
    with pytest.raises(FileExistsError, match="does not match"):
        checkpoint.check_out(mine)  # a rerun into it would lose the edit: refused
    assert card.read_text().endswith("My notes.\n")


def test_transformers_reads_rope_theta_and_generation_config(written, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, _, _ = written
    hf = json.loads((out / "config.json").read_text())
    assert hf["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 100000.0
    # transformers 4.x reads only the top-level key: a config without rope_parameters (4.x's
    # form) must give the same θ through transformers' own legacy conversion.
    legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", "quantization_config")}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)


def test_hf_source_generation_config_is_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    doc = {"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.6, "do_sample": True}
    (src / "generation_config.json").write_text(json.dumps(doc))
    got = model_card.source_generation_config(src)
    assert got == doc
    card = model_card.Card(generation_config=got)
    assert model_card.generation_config(CFG5, card) == doc
    assert model_card.generation_config(CFG5) == {"bos_token_id": 1, "eos_token_id": 2}
    assert model_card.source_generation_config("smollm2") is None
    (src / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        model_card.source_generation_config(src)


def test_peft_reads_base_model_name_or_path(written):
    peft = pytest.importorskip("peft")
    out, _, _ = written
    cfg = peft.PeftConfig.from_pretrained(str(out / "lora"))
    assert cfg.base_model_name_or_path == "some/source"
    assert cfg.r == 4


def test_diagnostics_json_and_summary(written):
    out, r, _ = written
    doc = json.loads((out / "diagnostics.json").read_text())
    assert doc["format"] == "arhq-jax-diagnostics"
    recs = doc["projections"]
    assert len(recs) == 7 * CFG5.num_layers == len(r.projections)
    for got, want in zip(recs, r.projections, strict=True):
        assert (got["layer"], got["proj"]) == (want["layer"], want["proj"])
        assert got["w_quant_rel_err"] == float(want["w_quant_rel_err"])
    rows = {row["proj"]: row for row in model_card.summary_rows(r.projections)}
    assert list(rows) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]  # fmt: skip
    for p, row in rows.items():
        errs = [float(d["w_quant_rel_err"]) for d in r.projections if d["proj"] == p]
        assert row["n"] == CFG5.num_layers
        np.testing.assert_allclose(row["w_quant_rel_err"], np.mean(errs, dtype=np.float64))
    text = model_card.diagnostics_text(r.projections)
    assert text.splitlines()[0].split()[:3] == ["projection", "n", "rel."]
    assert len(text.splitlines()) == 2 + 7
    assert "{" not in text  # a table, not a Python dict


def test_bits_per_weight_of_rtn_w4a4(model, tmp_path):
    """RTN NVFP4 W4A4: per linear N·K/2 code bytes, N·K/16 e4m3 scales, two f32 global scales."""
    params, ids = model
    qcfg = QuantConfig(method="rtn")
    q = quantize_model(params, CFG5, ids, qcfg, batch_size=8, progress=False).params
    out = tmp_path / "rtn"
    checkpoint.save(out, q, CFG5, quant=qcfg.to_dict(), card=model_card.Card())
    shapes = CFG5.linear_shapes()
    nk = sum(n * k for n, k in shapes.values()) * CFG5.num_layers
    n_lin = 7 * CFG5.num_layers
    want = (nk / 2 + nk / 16 + 8 * n_lin) * 8 / nk
    hf = json.loads((out / "config.json").read_text())
    bpw = model_card.bits_per_weight(out, hf["arhq_jax"]["modules"], CFG5, "lora")
    assert bpw["linears"] == n_lin and bpw["branch"] == 0.0
    assert bpw["total"] == pytest.approx(want, rel=1e-12)
    assert (
        f"{want:.3f} ({want:.3f} quantized base + 0.000 low-rank branch)"
        in (out / "README.md").read_text()
    )
    assert not (out / "lora").exists()


def test_without_a_card_only_the_generation_config_is_added(model, tmp_path):
    params, _ = model
    out = tmp_path / "float"
    checkpoint.save(out, params, CFG5)
    names = {p.name for p in out.iterdir()}
    assert "generation_config.json" in names
    assert not names & {"README.md", "provenance.json", "diagnostics.json"}


def test_two_identical_saves_write_identical_card_bytes(written, tmp_path):
    out, r, qcfg = written
    card = model_card.Card(command=COMMAND, diagnostics=r.projections, out="ck")
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        checkpoint.save(d, r.params, CFG5, quant=qcfg.to_dict(), card=card)
    for name in ("README.md", "provenance.json", "diagnostics.json", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
