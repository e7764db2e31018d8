"""Model directories are data: names read from a directory's files stay inside it (the index's
shard names), every JSON file parses with a nesting limit, malformed safetensors headers and
indexes are one-line errors, configs give finite models, and no tokenizer load may run code from
the directory (``trust_remote_code=False``; a .gguf's tokenizer from the file alone)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from _tiny_cli import write_hf_dir

from arhq_jax.storage.paths import PathEscapeError, inside, plain_name
from converters.hf import load_hf_dir
from converters.lazy import open_source
from converters.safetensors_io import SafetensorsReader, read_header, write_safetensors

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny Llama as a HF directory in two shards + index."""
    d = write_hf_dir(tmp_path_factory.mktemp("hf") / "tiny", with_tokenizer=False)
    with SafetensorsReader([d / "model.safetensors"]) as r:
        tensors = [(n, r.get(n)) for n in r.names()]
    os.unlink(d / "model.safetensors")
    half = len(tensors) // 2
    weight_map = {}
    for i, part in enumerate((tensors[:half], tensors[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(d / name, part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((n for n, _ in part), name))
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _both_loaders(d, pattern):
    """``load_hf_dir`` and the streaming source give the same one-line error."""
    for load in (load_hf_dir, lambda p: open_source(p).store.close()):
        with pytest.raises(ValueError, match=pattern) as e:
            load(d)
        assert "\n" not in str(e.value)


def _with_index(sharded, tmp_path, weight_map):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    (d / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return d


def test_sharded_dir_loads(sharded):
    cfg, _ = load_hf_dir(sharded)
    src = open_source(sharded)
    assert src.cfg == cfg
    src.store.close()


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_names_leaving_the_directory_are_refused(sharded, tmp_path, where):
    wm = json.loads((sharded / INDEX).read_text())["weight_map"]
    evil = tmp_path / "evil"
    evil.mkdir()
    for s in set(wm.values()):
        shutil.copy(sharded / s, evil / s)
    prefix = "../evil/" if where == "parent" else f"{evil}/"
    d = _with_index(sharded, tmp_path, {n: prefix + s for n, s in wm.items()})
    _both_loaders(d, "is not a plain file name inside the directory")


def test_a_shard_symlink_leaving_the_directory_is_refused(sharded, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    s = "model-00001-of-00002.safetensors"
    shutil.move(d / s, tmp_path / s)
    os.symlink(tmp_path / s, d / s)
    _both_loaders(d, "leads outside")


def test_a_hf_cache_snapshot_with_blob_links_loads(sharded, tmp_path):
    """The Hugging Face cache's layout: snapshots/<rev>/<file> -> ../../blobs/<sha>."""
    repo = tmp_path / "models--tiny"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        shutil.copy(f, blobs / f"sha-{f.name}")
        os.symlink(f"../../blobs/sha-{f.name}", snap / f.name)
    cfg, _ = load_hf_dir(snap)
    assert cfg == load_hf_dir(sharded)[0]


@pytest.mark.parametrize(
    "weight_map,pattern",
    [
        ([1, 2], "weight_map' must be a JSON object"),
        ("model-00001-of-00002.safetensors", "weight_map' must be a JSON object"),
        ({"model.norm.weight": 3}, r"weight_map\['model.norm.weight'\] must be a file name"),
        ({}, "weight_map' must be a JSON object"),
    ],
)
def test_malformed_index_is_a_named_error(sharded, tmp_path, weight_map, pattern):
    _both_loaders(_with_index(sharded, tmp_path, weight_map), pattern)


def test_index_must_match_the_shards(sharded, tmp_path):
    wm = json.loads((sharded / INDEX).read_text())["weight_map"]
    name = next(n for n, s in wm.items() if s.startswith("model-00001"))
    d = _with_index(sharded, tmp_path, {**wm, name: "model-00002-of-00002.safetensors"})
    _both_loaders(d, "weight_map does not match the shards' tensors")


def test_deep_json_in_a_model_directory_is_a_named_error(sharded, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _both_loaders(d, "config.json: JSON nested too deeply")
    shutil.copy(sharded / "config.json", d / "config.json")
    (d / INDEX).write_text('{"weight_map":' * 100 + "{}" + "}" * 100)
    _both_loaders(d, "nested deeper than 64")


def _header_file(path, header: bytes, data: bytes = b"\0" * 8):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
        {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]},
        {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1},
        [1, 2],
    ],
)
def test_malformed_safetensors_entries_are_named_errors(tmp_path, entry):
    f = _header_file(tmp_path / "x.safetensors", json.dumps({"t": entry}).encode())
    with pytest.raises(ValueError, match="corrupt safetensors entry for 't'"):
        read_header(f)


def test_deep_or_malformed_safetensors_headers_are_named_errors(tmp_path):
    f = _header_file(tmp_path / "deep.safetensors", b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(ValueError, match="corrupt safetensors header.*nested too deeply"):
        read_header(f)
    bad_meta = {"__metadata__": {"a": ["b"]}, "t": {"dtype": "F32", "shape": [2],
                                                    "data_offsets": [0, 8]}}  # fmt: skip
    f = _header_file(tmp_path / "meta.safetensors", json.dumps(bad_meta).encode())
    with pytest.raises(ValueError, match="__metadata__ must map str to str"):
        read_header(f)
    ok = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    f = _header_file(tmp_path / "ok.safetensors", json.dumps(ok).encode())
    assert read_header(f).tensors["t"].shape == (2,)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("rope_theta", float("nan"), "rope_theta must be a number in"),
        ("rope_theta", 0.0, "rope_theta"),
        ("rope_theta", -1e4, "rope_theta"),
        ("rms_norm_eps", 2.0, "rms_norm_eps must be in"),
    ],
)
def test_config_values_that_give_non_finite_models_are_refused(
    sharded, tmp_path, key, value, pattern
):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    hf = json.loads((d / "config.json").read_text())
    hf[key] = value
    if key == "rope_theta" and "rope_parameters" in hf:
        hf["rope_parameters"]["rope_theta"] = value
    (d / "config.json").write_text(json.dumps(hf))
    _both_loaders(d, pattern)


def test_path_helper(tmp_path):
    (tmp_path / "d").mkdir()
    assert inside(tmp_path / "d", "a.safetensors") == tmp_path / "d" / "a.safetensors"
    for bad in ("", "..", "../x", "/etc/passwd", "a/b", "a\\b", ".", None, 3):
        with pytest.raises(PathEscapeError):
            plain_name(bad)
    assert plain_name("lora/a.json", nested=True) == "lora/a.json"
    with pytest.raises(PathEscapeError):
        plain_name("lora/../a.json", nested=True)
    os.symlink(tmp_path, tmp_path / "d" / "up")
    with pytest.raises(PathEscapeError, match="leads outside"):
        inside(tmp_path / "d", "up")


# ----------------------------------------------------------------------------- tokenizers


def test_tokenizers_are_loaded_without_remote_code(tmp_path, monkeypatch):
    """Every transformers tokenizer load passes ``trust_remote_code=False``; a directory whose
    tokenizer_config.json names custom code (``auto_map``) runs none of it."""
    transformers = pytest.importorskip("transformers")
    from converters import registry

    d = write_hf_dir(tmp_path / "tiny")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\n")
    try:
        registry._hf_tokenizer(d)
    except ValueError as e:
        assert "\n" not in str(e)
    assert not (tmp_path / "PWNED").exists()

    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    registry._hf_tokenizer(write_hf_dir(tmp_path / "plain"))
    assert calls and all(k.get("trust_remote_code") is False for k in calls)


def test_a_gguf_tokenizer_reads_nothing_beside_the_file(tmp_path, monkeypatch):
    """transformers builds a gguf_file's tokenizer from the directory it is given: ours holds
    only the file, so files lying beside the .gguf (tokenizer configs, custom code) take no
    part unless a tokenizer directory is asked for."""
    transformers = pytest.importorskip("transformers")
    from converters import gguf

    seen = []

    def spy(d, gguf_file=None, **k):
        seen.append((sorted(os.listdir(d)), gguf_file, k.get("trust_remote_code")))
        return "tok"

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": {}}')
    assert gguf.load_gguf_tokenizer(f) == "tok"
    assert seen == [(["m.gguf"], "m.gguf", False)]
    gguf.load_gguf_tokenizer(f, tokenizer_dir=tmp_path)
    assert seen[1][0] == ["m.gguf", "tokenizer_config.json"] and seen[1][2] is False
