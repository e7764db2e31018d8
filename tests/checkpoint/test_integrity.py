"""The manifest vouches for the whole checkpoint directory, configs are read rather than assumed,
and a file's numbers give finite results: each crafted directory below (made from a tiny
quantized checkpoint, its manifest rewritten where the test is about what lies past it) is a
one-line ``CheckpointError`` naming the problem, or loads with the value PEFT would use."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.checkpoint.out_dir import CheckpointError, write_manifest
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model
from converters.safetensors_io import SafetensorsReader, write_safetensors

Q = "model.layers.0.self_attn.q_proj"


def _save(model, tmp_path_factory, name, max_shard_bytes=None, **recipe):
    params, ids = model
    qcfg = QuantConfig(**recipe)
    q = quantize_model(params, CFG, ids, qcfg, batch_size=6, progress=False).params
    out = tmp_path_factory.mktemp("ck") / name
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    checkpoint.save(out, q, CFG, quant=qcfg.to_dict(), **kw)
    return out


@pytest.fixture(scope="module")
def ck(model, tmp_path_factory):
    """ARHQ W4A4 NVFP4 rank 4: compressed-tensors + a PEFT adapter in lora/."""
    return _save(model, tmp_path_factory, "arhq", method="arhq", rank=4)


@pytest.fixture(scope="module")
def ck_sharded(model, tmp_path_factory):
    """RTN NVFP4 in shards + model.safetensors.index.json."""
    return _save(model, tmp_path_factory, "sharded", max_shard_bytes=40_000, method="rtn")


@pytest.fixture(scope="module")
def ck_own(model, tmp_path_factory):
    """RTN MXFP4: arhq-jax's own layout."""
    return _save(model, tmp_path_factory, "mx", method="rtn", w_fmt="mxfp4", act_fmt="mxfp4")


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _reseal(d):
    """Rewrite the manifest so that it lists the directory as it now is (past integrity)."""
    write_manifest(d, checkpoint.FORMAT, checkpoint.FORMAT_VERSION)


def _edit_json(d, rel, edit, reseal=True):
    f = d / rel
    doc = json.loads(f.read_text())
    doc = edit(doc) or doc
    f.write_text(json.dumps(doc))
    if reseal:
        _reseal(d)


def _refused(d, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        checkpoint.load(d)
    assert "\n" not in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------- the manifest


def test_an_unlisted_index_pointing_outside_is_refused(ck_sharded, tmp_path):
    # Altered weights outside the directory, and an index beside a single-file checkpoint
    # pointing every tensor at them: the manifest never listed the index.
    d = _copy(ck_sharded, tmp_path / "ck")
    evil = tmp_path / "evil"
    evil.mkdir()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    for s in shards:
        shutil.copy(d / s, evil / s)
    evil_map = {n: f"../evil/{s}" for n, s in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": evil_map}))
    _refused(d, "manifest")  # (the index is listed: its bytes changed)
    # The same index with the manifest rewritten to list it: the names are refused.
    _reseal(d)
    _refused(d, r"'\.\./evil/model-00001-of-0000\d\.safetensors' is not a plain file name")
    abs_map = {n: str(evil / s) for n, s in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": abs_map}))
    _reseal(d)
    _refused(d, "is not a plain file name")


def test_an_added_file_is_refused(ck, tmp_path):
    d = _copy(ck, tmp_path / "ck")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"{Q}.weight_packed": "../evil/model.safetensors"}})
    )
    _refused(d, r"model.safetensors.index.json: not listed in manifest.json")
    os.unlink(d / "model.safetensors.index.json")
    (d / "lora" / "extra.safetensors").write_bytes(b"x")
    _refused(d, r"extra.safetensors: not listed")


@pytest.mark.parametrize("how", ["empty", "no-weights", "no-config"])
def test_a_partial_manifest_is_refused(ck, tmp_path, how):
    d = _copy(ck, tmp_path / "ck")
    drop = {"empty": None, "no-weights": "model.safetensors", "no-config": "config.json"}[how]

    def edit(doc):
        if drop is None:
            doc["files"] = {}
        else:
            del doc["files"][drop]

    _edit_json(d, "manifest.json", edit, reseal=False)
    _refused(d, "not listed in manifest.json")


def test_listed_but_unused_weights_and_missing_required_files_are_refused(ck, tmp_path):
    d = _copy(ck, tmp_path / "stray")
    shutil.copy(d / "model.safetensors", d / "model-evil.safetensors")
    _reseal(d)
    _refused(d, "model-evil.safetensors: a weight file the checkpoint does not use")
    d = _copy(ck, tmp_path / "noweights")
    os.unlink(d / "model.safetensors")
    _reseal(d)
    _refused(d, "neither model.safetensors nor")
    d = _copy(ck, tmp_path / "noadaptercfg")
    os.unlink(d / "lora" / "adapter_config.json")
    _reseal(d)
    _refused(d, "lora: must hold exactly")


def test_symlinks_are_refused(ck, tmp_path):
    # A lora/ linked to a directory outside (whose files the manifest lists with the right
    # hashes: the manifest is rewritten through the link).
    d = _copy(ck, tmp_path / "ck")
    outside = tmp_path / "outside-lora"
    shutil.move(d / "lora", outside)
    os.symlink(outside, d / "lora")  # the manifest's hashes still match through the link
    _refused(d, "lora: a symlink inside a checkpoint")
    d = _copy(ck, tmp_path / "ck2")
    shutil.move(d / "model.safetensors", tmp_path / "w.safetensors")
    os.symlink(tmp_path / "w.safetensors", d / "model.safetensors")
    _refused(d, "model.safetensors: a symlink inside a checkpoint")


def test_a_sharded_checkpoint_with_a_wrong_weight_map_is_refused(ck_sharded, tmp_path):
    d = _copy(ck_sharded, tmp_path / "ck")
    checkpoint.load(d)  # as written: fine
    index = json.loads((d / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    a, b = sorted(set(wm.values()))[:2]
    name = next(n for n, s in wm.items() if s == a)
    wm[name] = b  # transformers would look for it in the wrong shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _reseal(d)
    _refused(d, "weight_map does not match the shards' tensors")
    for bad in ([1, 2], "model.safetensors", {name: 3}):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
        _reseal(d)
        _refused(d, "weight_map")


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("rel", ["config.json", "manifest.json", "lora/adapter_config.json"])
def test_deeply_nested_json_is_a_named_error(ck, tmp_path, rel):
    d = _copy(ck, tmp_path / "ck")
    (d / rel).write_text("[" * 200_000 + "]" * 200_000)
    if rel != "manifest.json":
        _reseal(d)
    _refused(d, "nested too deeply")
    (d / rel).write_text('{"a":' * 100 + "1" + "}" * 100)  # parses, but past the limit
    if rel != "manifest.json":
        _reseal(d)
    _refused(d, "nested deeper than 64 levels")


def test_a_non_json_or_missing_adapter_config_is_a_named_error(ck, tmp_path):
    d = _copy(ck, tmp_path / "ck")
    (d / "lora" / "adapter_config.json").write_text("{r: 4")
    _reseal(d)
    _refused(d, "adapter_config.json: invalid JSON")


# ----------------------------------------------------------------------------- adapter config


def _peft_scaling(lora_dir):
    """The scaling PEFT's own LoRA layer applies, built from PEFT's reading of the adapter
    config (the independent reference)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear

    cfg = peft.LoraConfig.from_pretrained(str(lora_dir))
    layer = Linear(torch.nn.Linear(64, 64), "default", cfg, r=cfg.r, lora_alpha=cfg.lora_alpha)
    return layer.scaling["default"]


@pytest.mark.parametrize(
    "alpha,rslora",
    [(4, False), (16, False), (0, False), (2, True), (4, True), (2.0, False)],
)
def test_lora_scaling_is_what_peft_applies_or_refused(ck, tmp_path, alpha, rslora):
    """Rank 4: PEFT scales by alpha/4 (alpha/2 with rsLoRA). arhq-jax's branch is unscaled: the
    directory loads exactly when PEFT's scaling is 1, and is refused otherwise."""
    d = _copy(ck, tmp_path / "ck")
    _edit_json(
        d, "lora/adapter_config.json", lambda c: c.update(lora_alpha=alpha, use_rslora=rslora)
    )
    peft = _peft_scaling(d / "lora")
    if peft == 1.0:
        checkpoint.load(d)
    else:
        msg = _refused(d, "PEFT scales the branch of .* only scaling 1 is read")
        assert f"= {peft:.4g};" in msg


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (dict(r=8, lora_alpha=8), "r for model.layers.0.* is 8, its tensors have rank 4"),
        (dict(use_dora=True), "use_dora is True"),
        (
            dict(target_modules=["q_proj", "evil_proj"]),
            "target_modules do not select 'model.layers",
        ),
        (
            dict(
                target_modules=[
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                    "evil_proj",
                ]
            ),
            "'evil_proj' has no adapter tensors",
        ),  # fmt: skip
        (dict(target_modules="q_proj|k_proj"), "target_modules must be a list"),
        (dict(peft_type="LOHA"), "peft_type 'LOHA'"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(rank_pattern={"(a+)+$": 2}), "not a plain module name"),
        (dict(alpha_pattern={"^model.layers.0.self_attn.q_proj$": 8}), "q_proj by .*= 2;"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    ],
)
def test_adapter_config_is_checked_against_the_tensors(ck, tmp_path, edit, pattern):
    d = _copy(ck, tmp_path / "ck")
    _edit_json(d, "lora/adapter_config.json", lambda c: c.update(edit))
    _refused(d, pattern)


# ----------------------------------------------------------------------------- quantization_config


@pytest.mark.parametrize(
    "path,value,pattern",
    [
        (("quant_method",), "evil-method", r"quantization_config.quant_method \(\"evil-method\""),
        (("config_groups", "group_0", "weights", "group_size"), 32, "weights.group_size \\(32"),
        (("config_groups", "group_0", "weights", "num_bits"), 8, "num_bits"),
        (("config_groups", "group_0", "weights", "strategy"), "channel", "strategy"),
        (("config_groups", "group_0", "input_activations", "dynamic"), False, "dynamic"),
        (("format",), "float-quantized", "format"),
        ((), None, r"quantization_config \(absent"),
    ],
)
def test_quantization_config_must_match_the_tensors(ck, tmp_path, path, value, pattern):
    d = _copy(ck, tmp_path / "ck")

    def edit(hf):
        if not path:
            del hf["quantization_config"]
            return
        node = hf["quantization_config"]
        for k in path[:-1]:
            node = node[k]
        assert path[-1] in node
        node[path[-1]] = value

    _edit_json(d, "config.json", edit)
    _refused(d, pattern)


def test_own_layout_quantization_config_is_checked_too(ck_own, tmp_path):
    d = _copy(ck_own, tmp_path / "ck")
    _edit_json(d, "config.json", lambda hf: hf["quantization_config"].update(group_size=32))
    _refused(d, r"quantization_config.group_size \(32, expected absent\)")
    for qc in ({"quant_method": "compressed-tensors"}, None):
        d = _copy(ck_own, tmp_path / f"ck-{qc}")
        _edit_json(d, "config.json", lambda hf, qc=qc: hf.update(quantization_config=qc))
        _refused(d, "config.json: model_type 'arhq-jax' is for arhq-jax's own layout only")


# ----------------------------------------------------------------------------- own layout


def test_transformers_refuses_an_own_layout_checkpoint_that_arhq_jax_reads(ck_own):
    hf = json.loads((ck_own / "config.json").read_text())
    assert hf["model_type"] == "arhq-jax" and hf["arhq_jax"]["model_type"] == "llama"
    assert hf["quantization_config"]["quant_method"] == "arhq-jax"
    params, cfg, _ = checkpoint.load(ck_own, expect_config=CFG)
    assert cfg == CFG
    assert "arhq-jax's own layout" in checkpoint.describe(ck_own)
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="model type `arhq-jax`"):
        AutoModelForCausalLM.from_pretrained(str(ck_own))


# ----------------------------------------------------------------------------- values


def _edit_tensor(d, suffix, value, rel="model.safetensors"):
    with SafetensorsReader([d / rel]) as r:
        tensors = [(n, r.get(n)) for n in r.names()]
    hit = [n for n, _ in tensors if n.endswith(suffix)]
    assert hit, suffix
    tensors = [(n, np.full_like(x, value) if n == hit[0] else x) for n, x in tensors]
    write_safetensors(d / rel, tensors, metadata={"format": "pt"})
    _reseal(d)


@pytest.mark.parametrize(
    "suffix,value,pattern",
    [
        (f"{Q}.weight_global_scale", 1e-45, r"weight_global_scale: scale .* outside \(1e-30"),
        (f"{Q}.weight_global_scale", 3e38, r"weight_global_scale: values up to 3e\+38"),
        (f"{Q}.weight_global_scale", 1e-3, "decodes weights up to"),
        (f"{Q}.input_global_scale", 1e-45, r"input_global_scale: scale .* outside"),
        ("model.embed_tokens.weight", 3e38, r"embed_tokens.weight: values up to 3e\+38"),
        ("model.layers.1.input_layernorm.weight", -3e38, "values up to 3e"),
        ("model.norm.weight", 1e7, r"values up to 1e\+07 \(\|x\| must stay below 1e\+06\)"),
    ],
)
def test_out_of_range_scales_and_weights_are_refused(ck, tmp_path, suffix, value, pattern):
    d = _copy(ck, tmp_path / "ck")
    _edit_tensor(d, suffix, value)
    _refused(d, pattern)


def test_out_of_range_own_layout_scales_and_lora_factors_are_refused(ck_own, ck, tmp_path):
    d = _copy(ck_own, tmp_path / "own")
    _edit_tensor(d, f"{Q}.w.tensor_scale", 1e-45)
    _refused(d, r"q_proj.w.tensor_scale: scale .* outside")
    d = _copy(ck, tmp_path / "lora")
    _edit_tensor(d, f"{Q}.lora_B.weight", 3e38, rel="lora/adapter_model.safetensors")
    _refused(d, "lora_B.weight: values up to")


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("rope_theta", float("nan"), "rope_theta must be a number in"),
        ("rope_theta", 0.0, "rope_theta"),
        ("rope_theta", -1e4, "rope_theta"),
        ("rms_norm_eps", 5.0, r"rms_norm_eps must be in \(0, 1\)"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ],
)
def test_bad_config_values_are_refused(ck, tmp_path, key, value, pattern):
    d = _copy(ck, tmp_path / "ck")

    def edit(hf):
        if key == "rope_theta" and "rope_parameters" in hf:
            hf["rope_parameters"]["rope_theta"] = value
        hf[key] = value

    _edit_json(d, "config.json", edit)
    _refused(d, pattern)


# ----------------------------------------------------------------------------- reproducible bytes


def test_two_identical_quantize_runs_write_identical_bytes(tmp_path, capsys):
    from _tiny_cli import write_hf_dir

    from arhq_jax.cli.main import main

    src = write_hf_dir(tmp_path / "tiny")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["--method", "arhq", "--rank", "4", "--calib-tokens", "256", "--calib-seq-len", "64"]
        rc = main(["quantize", "--model", str(src), *args, "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
    files = [sorted(str(p.relative_to(o)) for p in o.rglob("*") if p.is_file()) for o in outs]
    assert files[0] == files[1] and "lora/adapter_model.safetensors" in files[0]
    # provenance.json and the model card record the command line, whose --out differs; the
    # manifest holds their sha256. Everything else is byte for byte the same.
    invocation = ("provenance.json", "README.md")
    for rel in files[0]:
        a, b = (outs[0] / rel).read_bytes(), (outs[1] / rel).read_bytes()
        if rel in invocation:
            a = a.replace(str(outs[0]).encode(), b"OUT").replace(b"# a\n", b"# OUT\n")
            b = b.replace(str(outs[1]).encode(), b"OUT").replace(b"# b\n", b"# OUT\n")
        if rel != "manifest.json":
            assert a == b, rel
    recipe = json.loads((outs[0] / "config.json").read_text())["arhq_jax"]["recipe"]
    assert "timings" not in recipe and recipe["method"] == "arhq"
    assert "calibration" in capsys.readouterr().out  # the timings went to the log


def test_json_helpers_name_what_they_refuse():
    from arhq_jax.storage.jsonio import JSONFileError, loads_json

    assert loads_json('{"a": [1, {"b": 2}]}', "x") == {"a": [1, {"b": 2}]}
    with pytest.raises(JSONFileError, match="x: JSON nested too deeply"):
        loads_json("[" * 100_000 + "]" * 100_000, "x")
    with pytest.raises(JSONFileError, match="deeper than 3"):
        loads_json("[[[[1]]]]", "x", max_depth=3)
    assert loads_json("[[[1]]]", "x", max_depth=3) == [[[1]]]
    with pytest.raises(JSONFileError, match="invalid JSON"):
        loads_json(b"\xff{", "x")
    assert math.isnan(loads_json("NaN", "x"))  # (the loaders' range checks refuse it)
