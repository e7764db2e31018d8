"""Checkpoint directories: round trips for every method and format, a data-only loader that no
crafted file can make run code, integrity (manifest), provenance, and an --out that never destroys
what it did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import schema as checkpoint_schema
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.checkpoint.out_dir import CheckpointError, write_manifest
from arhq_jax.evaluation import metrics as ev
from arhq_jax.models.params import random_params
from arhq_jax.numerics import formats
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

RECIPES = {
    "rtn-nvfp4": dict(method="rtn"),
    "rtn-nvfp4-w4a16": dict(method="rtn", act_fmt=None),
    "rtn-nvfp4-paper": dict(method="rtn", w_fmt="nvfp4-paper", act_fmt="nvfp4-paper"),
    "rtn-mxfp4": dict(method="rtn", w_fmt="mxfp4", act_fmt="mxfp4"),
    "rtn-int4": dict(method="rtn", w_fmt="int4", act_fmt="int8"),
    "rtn-int8-asym": dict(method="rtn", w_fmt="int8-asym", act_fmt=None),
    "svdquant": dict(method="svdquant", rank=4),
    "arhq": dict(method="arhq", rank=4),
    "arhq-smooth": dict(method="arhq", rank=4, setting="smooth"),
    "arhq-gptq": dict(method="arhq", rank=4, residual_quant="gptq"),
    "gptq": dict(method="gptq"),
    "smoothquant": dict(method="smoothquant"),
    "awq": dict(method="awq"),
    "awq-dh": dict(method="awq-dh"),
    "serq": dict(method="serq", rank=8),
    "resq": dict(method="resq"),
}


def _quantize(model, recipe):
    params, ids = model
    qcfg = QuantConfig(**RECIPES[recipe])
    return quantize_model(params, CFG, ids, qcfg, batch_size=6, progress=False).params, qcfg


def _logits(params, ids):
    return np.asarray(ev.jitted_forward()(params, CFG, jax.numpy.asarray(ids[:2])))


@pytest.fixture(scope="module")
def arhq_ckpt(model, tmp_path_factory):
    """An ARHQ checkpoint of the tiny model (W4A4 NVFP4, rank 4) and its params."""
    qparams, qcfg = _quantize(model, "arhq")
    out = tmp_path_factory.mktemp("ck") / "arhq"
    source = {"model": "tiny", "fingerprint": checkpoint.fingerprint(CFG, model[0])}
    checkpoint.save(out, qparams, CFG, quant=qcfg.to_dict(), source=source)
    return out, qparams


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_roundtrip_is_bit_identical(model, recipe, tmp_path):
    qparams, qcfg = _quantize(model, recipe)
    out = tmp_path / "ck"
    nbytes = checkpoint.save(out, qparams, CFG, quant=qcfg.to_dict(), max_shard_bytes=40_000)
    loaded, cfg, quant = checkpoint.load(out, expect_config=CFG)
    assert cfg == CFG and QuantConfig.from_dict(quant) == qcfg
    assert nbytes == checkpoint.tree_nbytes(qparams)
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        bits = [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in (a, b)]
        np.testing.assert_array_equal(*bits)
    np.testing.assert_array_equal(_logits(loaded, model[1]), _logits(qparams, model[1]))
    # Sharded past 40 kB, as transformers names shards.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize(
    "fmt,kw,rule,variant",
    [
        ("int4", {"group_size": -1, "sign_magnitude": True}, "default", "serq"),
        ("int4", {"group_size": 128}, "gptq", "gptq"),
        ("int4-asym", {"group_size": 128}, "fprag", "fprag"),
        ("int8", {}, "default", "default"),
        ("nvfp4", {}, "default", "default"),
    ],
)
def test_format_entry_keeps_the_version_2_int_variant(fmt, kw, rule, variant):
    """The format entry's one "int_variant" key (format version 2) carries the sign-magnitude
    layout (a format property) and the QTensor's int scale rule (a method's choice): files written
    before and after the split are the same and read the same."""
    spec = formats.resolve_format(fmt, **kw)
    entry = checkpoint_schema.format_entry(spec, rule)
    assert entry["int_variant"] == variant and "sign_magnitude" not in entry
    assert checkpoint_schema.decode_format_rule(json.loads(json.dumps(entry)), "w") == (spec, rule)
    bad = {**entry, "int_variant": "awq"}
    with pytest.raises(CheckpointError, match="int_variant"):
        checkpoint_schema.decode_format_rule(bad, "w")


def test_layout_is_compressed_tensors_and_peft(arhq_ckpt):
    out, qparams = arhq_ckpt
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "compressed-tensors"
    from converters.safetensors_io import SafetensorsReader

    with SafetensorsReader([out / "model.safetensors"]) as r:
        names = set(r.names())
        q = "model.layers.0.self_attn.q_proj"
        assert {f"{q}.weight_packed", f"{q}.weight_scale", f"{q}.weight_global_scale"} <= names
        assert f"{q}.input_global_scale" in names and f"{q}.weight" not in names
        assert r.get(f"{q}.weight_packed").dtype == np.uint8
    umask = os.umask(0)
    os.umask(umask)
    for f in out.rglob("*"):  # readable by whoever serves it (not mkstemp's 0600)
        assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~umask, f
    lora = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == lora["lora_alpha"] == 4
    assert set(lora["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    with SafetensorsReader([out / "lora" / "adapter_model.safetensors"]) as r:
        a_t = r.get(f"base_model.model.{q}.lora_A.weight")
        b = r.get(f"base_model.model.{q}.lora_B.weight")
    lin = qparams.layers[0].q_proj
    np.testing.assert_array_equal(a_t, np.asarray(lin.a).T)
    np.testing.assert_array_equal(b, np.asarray(lin.b))


# ----------------------------------------------------------------------------- integrity


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _files(d):
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_every_changed_truncated_or_missing_file_is_a_named_error(arhq_ckpt, tmp_path):
    src, _ = arhq_ckpt
    rels = [p.relative_to(src) for p in _files(src)] + [src.joinpath("manifest.json")]
    rels[-1] = rels[-1].relative_to(src)
    assert {"config.json", "model.safetensors", "lora/adapter_model.safetensors"} <= {
        str(r) for r in rels
    }
    for i, rel in enumerate(rels):
        for how in ("flip", "truncate", "delete"):
            d = _copy(src, tmp_path / f"{i}-{how}")
            f = d / rel
            data = bytearray(f.read_bytes())
            if how == "flip":
                data[len(data) // 2] ^= 0x01
                f.write_bytes(bytes(data))
            elif how == "truncate":
                f.write_bytes(bytes(data[: len(data) // 2]))
            else:
                f.unlink()
            with pytest.raises((CheckpointError, FileNotFoundError)) as e:
                checkpoint.load(d)
            msg = str(e.value)
            assert "\n" not in msg and (str(rel.name) in msg or "manifest" in msg), msg


def _strings_rewritten(obj, payload):
    """Every string value and key replaced by ``payload``-style strings, plus injected keys."""
    if isinstance(obj, dict):
        out = {k: _strings_rewritten(v, payload) for k, v in obj.items()}
        out["__class__"] = payload
        out["fields"] = out.get("fields", {"command": "touch PWNED"})
        return out
    if isinstance(obj, list):
        return [_strings_rewritten(v, payload) for v in obj]
    if isinstance(obj, str):
        return payload
    return obj


PAYLOADS = ("os:system", "arhq_jax.checkpoint.store:os.system", "builtins:eval", "subprocess.Popen")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_json_runs_no_code(arhq_ckpt, tmp_path, monkeypatch, payload):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    src, _ = arhq_ckpt
    json_files = [p.relative_to(src) for p in _files(src) if p.suffix == ".json"]
    rng = np.random.default_rng(0)
    outcomes = []
    for rel in json_files:
        doc = json.loads((src / rel).read_text())
        # Whole-file rewrite, and single-field rewrites inside the arhq_jax section.
        variants = [_strings_rewritten(doc, payload)]
        if "arhq_jax" in doc:
            mods = doc["arhq_jax"]["modules"]
            for key in rng.choice(sorted(mods), 6, replace=False):
                v = json.loads(json.dumps(doc))
                entry = v["arhq_jax"]["modules"][key]
                entry["kind"] = payload
                v2 = json.loads(json.dumps(doc))
                v2["arhq_jax"]["modules"][key] = {"__class__": payload, "fields": {"command": "x"}}
                variants += [v, v2]
            v3 = json.loads(json.dumps(doc))
            v3["arhq_jax"]["recipe"]["__class__"] = payload  # recipe is data: loads fine
            variants.append(v3)
        for j, v in enumerate(variants):
            d = _copy(src, tmp_path / f"{rel.name}-{j}")
            (d / rel).write_text(json.dumps(v))
            write_manifest(d, checkpoint.FORMAT, checkpoint.FORMAT_VERSION)  # past integrity
            try:
                checkpoint.load(d)
                outcomes.append("ok")
            except (CheckpointError, FileNotFoundError) as e:
                assert "\n" not in str(e)
                outcomes.append("error")
    assert not calls and not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    assert "error" in outcomes and "ok" in outcomes  # the recipe edit loads; the rest refused


def test_crafted_tensor_shapes_and_values_are_refused(arhq_ckpt, tmp_path):
    src, _ = arhq_ckpt
    from converters.safetensors_io import SafetensorsReader, write_safetensors

    # (either layout: compressed-tensors names, or arhq-jax's own)
    cases = {
        "nan": (("input_layernorm.weight",), lambda x: np.full_like(x, np.nan)),
        "scale-nan": (
            ("q_proj.weight_scale", "q_proj.w.scales"),
            lambda x: np.full_like(x, np.nan),
        ),
        "shape": (("q_proj.weight_scale", "q_proj.w.scales"), lambda x: x[:-1]),
        "dtype": (("q_proj.weight_packed", "q_proj.w.codes"), lambda x: x.astype(np.float32)),
    }
    for what, (suffixes, edit) in cases.items():
        d = _copy(src, tmp_path / what)
        with SafetensorsReader([src / "model.safetensors"]) as r:
            tensors = [(n, edit(r.get(n)) if n.endswith(suffixes) else r.get(n)) for n in r.names()]
        assert any(n.endswith(suffixes) for n, _ in tensors)
        write_safetensors(d / "model.safetensors", tensors)
        write_manifest(d, checkpoint.FORMAT, checkpoint.FORMAT_VERSION)
        with pytest.raises(CheckpointError):
            checkpoint.load(d)


def test_another_source_model_is_refused(arhq_ckpt, model):
    out, _ = arhq_ckpt
    other = random_params(CFG, jax.random.key(7), std=0.08)  # same shapes, other weights
    checkpoint.load(out, expect_fingerprint=checkpoint.fingerprint(CFG, model[0]))
    with pytest.raises(CheckpointError, match="made from another model.*allow-other-source"):
        checkpoint.load(out, expect_fingerprint=checkpoint.fingerprint(CFG, other))


# ----------------------------------------------------------------------------- --out


def test_out_never_destroys_what_it_did_not_write(model, arhq_ckpt, tmp_path):
    params, _ = model
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text("{}")  # the old format's marker does not count
    (foreign / "model.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not an arhq-jax checkpoint"):
        checkpoint.save(foreign, params, CFG)
    assert sorted(p.name for p in foreign.iterdir()) == ["meta.json", "model.bin"]
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        checkpoint.save(afile, params, CFG)
    # Our own checkpoint is replaced; with a file added by the user, it is refused.
    own = _copy(arhq_ckpt[0], tmp_path / "own")
    checkpoint.save(own, params, CFG)
    assert "quantization_config" not in json.loads((own / "config.json").read_text())
    (own / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write.*notes.txt"):
        checkpoint.save(own, params, CFG)
    assert (own / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "foreign", "own"]


def test_failed_and_killed_saves_leave_nothing(model, tmp_path, monkeypatch):
    params, _ = model
    out = tmp_path / "ck"
    # A temporary directory of a killed run (its marker names a dead process) is removed.
    stale = tmp_path / ".ck.arhq-tmp-dead"
    stale.mkdir()
    (stale / ".arhq-jax-partial").write_text("999999999")
    kept = tmp_path / ".ck.arhq-tmp-notours"
    kept.mkdir()
    checkpoint.save(out, params, CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.arhq-tmp-notours", "ck"]
    shutil.rmtree(kept)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.out_dir, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(out, params, CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    checkpoint.load(out)  # the previous checkpoint is intact
