"""Hugging Face checkpoint directories ↔ (ModelConfig, Params) (docs/spec/models.md §3).

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Tensors are streamed one at a time: each is read, checked against
the config's shape and cast to the parameter dtype by ``params_from_tensors``.

Writing mirrors transformers 5.x ``save_pretrained``: ``config.json`` + ``model.safetensors`` with
the tied ``lm_head.weight`` omitted. Everything is written to a temporary directory beside the
destination and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from arhq_jax.models import config_from_hf, config_to_hf, family_of
from arhq_jax.models.config import ModelConfig, Params
from arhq_jax.models.params import params_from_tensors, params_to_tensors
from arhq_jax.storage.atomic import atomic_dir
from arhq_jax.storage.jsonio import loads_json, read_json
from arhq_jax.storage.paths import hf_cache_link, inside
from converters.orbax_layout import ORBAX_ENTRIES, is_orbax_dir
from converters.safetensors_io import SafetensorsReader, read_header, write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The marker in model.safetensors' metadata of a directory written by ``write_hf_files``.
WRITER_KEY, WRITER, FILES_KEY = "arhq_jax.writer", "converters.save_hf_dir", "arhq_jax.files"
# Tensors that some checkpoints carry and that hold nothing we need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_hf_config(path: str | Path) -> dict:
    """``config.json`` of a HF directory, with a clear error for a missing file or foreign model."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found (a HF model directory needs {CONFIG_FILE})")
    inside(path, CONFIG_FILE, allow_link=hf_cache_link)
    d = read_json(cfg_file)
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file}: not a JSON object")
    try:
        family_of(d)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return d


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a HF directory: the index's shards, or ``model.safetensors``.

    The index's ``weight_map`` must map tensor names (str) to plain file names in the directory
    (``storage.paths.inside``: no ``..``, no absolute path, no symlink leading out of it, the
    Hugging Face cache's blob links aside); anything else is a ValueError naming the index.
    """
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file() or index.is_symlink():
        return [inside(path, f, str(index), allow_link=hf_cache_link) for f in index_shards(path)]
    single = inside(path, WEIGHTS_FILE, allow_link=hf_cache_link)
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def read_index(path: str | Path) -> dict[str, str]:
    """``weight_map`` of ``path``'s ``model.safetensors.index.json``, validated: a JSON object of
    str → plain file name (each shard present as a regular file)."""
    path = Path(path)
    index = inside(path, INDEX_FILE, allow_link=hf_cache_link)
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{index}: not a safetensors index ('weight_map' must be a JSON object "
            "of tensor name -> shard file name)"
        )
    for name, f in weight_map.items():
        if not isinstance(f, str):
            raise ValueError(f"{index}: weight_map[{name!r}] must be a file name, got {f!r}")
        inside(path, f, str(index), allow_link=hf_cache_link)
    return weight_map


def index_shards(path: str | Path) -> list[str]:
    """The shard file names of ``path``'s index, in first-use order, each present."""
    path = Path(path)
    names = list(dict.fromkeys(read_index(path).values()))
    for f in names:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} not found (listed in {path / INDEX_FILE})")
    return names


def check_index_matches(path: str | Path, reader) -> None:
    """ValueError unless the index's ``weight_map`` names every tensor of ``reader`` (opened on
    the index's shards) at the shard that holds it, and nothing else (transformers reads each
    tensor where the map says; we read the shards' headers: both must be the same)."""
    path = Path(path)
    weight_map = read_index(path)
    held = {n: reader.info_path(n).name for n in reader.names()}
    if held != weight_map:
        diff = sorted(set(held.items()) ^ set(weight_map.items()))
        raise ValueError(
            f"{path / INDEX_FILE}: weight_map does not match the shards' tensors "
            f"(first difference: {diff[0][0]!r})"
        )


def check_config_values(cfg: ModelConfig, where) -> ModelConfig:
    """ValueError unless the config's numbers give finite results: 1 < rope_theta < 1e12,
    0 < rms_norm_eps < 1, 1 <= vocab_size < 2**31 (int32 token ids), rope scaling values
    finite and positive. Returns ``cfg``."""

    def bad(what):
        raise ValueError(f"{where}: {what}")

    theta = cfg.rope_theta
    if not isinstance(theta, (int, float)) or not 1.0 < theta < 1e12:
        bad(f"rope_theta must be a number in (1, 1e12), got {theta!r}")
    if not 0.0 < cfg.rms_norm_eps < 1.0:
        bad(f"rms_norm_eps must be in (0, 1), got {cfg.rms_norm_eps!r}")
    if not 1 <= cfg.vocab_size < 2**31:
        bad(f"vocab_size must be in [1, 2**31), got {cfg.vocab_size}")
    for k, v in cfg.rope_scaling_dict().items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 < v < 1e12:
            bad(f"rope scaling {k} must be positive and finite, got {v!r}")
    return cfg


def params_from_getter(cfg: ModelConfig, get: Callable[[str], np.ndarray | None], names, where):
    """Build params from HF-named tensors and reject tensors the model would silently drop.

    ``names``: every tensor name the source holds; ``where``: the source, for error messages.
    """

    used: set[str] = set()

    def tracked(name: str):
        used.add(name)
        return get(name)

    # Shapes, dtypes, finiteness and a tied file's lm_head copy are checked there.
    try:
        params = params_from_tensors(cfg, tracked)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    reject_unused(cfg, names, used, where)
    return params


def reject_unused(cfg: ModelConfig, names, used, where) -> None:
    """ValueError naming the tensors of ``names`` (the source's) outside ``used`` (the model's):
    a config that does not match its weights would otherwise drop them silently."""
    unused = [n for n in names if n not in used and not n.endswith(IGNORED_SUFFIXES)]
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ValueError(
            f"{where}: tensors not used by the {cfg.family} model (config mismatch?): "
            f"{', '.join(unused[:5])}{more}"
        )


def load_hf_dir(
    path: str | Path, *, param_dtype: str = "float32", dtype: str | None = None
) -> tuple[ModelConfig, Params]:
    """Load a HF Llama/Qwen3 directory -> ``(cfg, params)`` with parameters in ``param_dtype``.

    ``dtype`` is the compute dtype (default: ``param_dtype``).
    """

    path = Path(path)
    d = read_hf_config(path)
    try:
        cfg = config_from_hf(d, param_dtype=param_dtype, dtype=dtype or param_dtype)
    except (ValueError, TypeError) as e:  # a wrong value or type in the JSON (int([..]), ...)
        raise ValueError(f"{path / CONFIG_FILE}: {e}") from None
    check_config_values(cfg, path / CONFIG_FILE)
    files = weight_files(path)
    with SafetensorsReader(files) as reader:
        if len(files) > 1 or files[0].name != WEIGHTS_FILE:
            check_index_matches(path, reader)
        params = params_from_getter(cfg, reader.get, reader.names(), path)
    return cfg, params


def check_replaceable(dst: str | Path, overwrite: bool) -> None:
    """Raise FileExistsError unless ``dst`` may be written: it does not exist, or ``overwrite``
    is set and ``dst`` is a directory these converters wrote (``written_by_converters``)."""
    dst = Path(dst)
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{dst} already exists (overwrite=True, --overwrite, replaces a directory that "
            "convert wrote)"
        )
    if dst.is_symlink() or not written_by_converters(dst):
        raise FileExistsError(
            f"{dst} exists and is not a model directory written by arhq-jax convert; refusing to "
            "replace it"
        )


def written_by_converters(path: str | Path) -> bool:
    """Whether ``path`` is a directory that ``save_hf_dir`` / ``save_orbax`` wrote, holding
    nothing else: a HF directory whose ``model.safetensors`` carries our writer marker and the
    list of files written with it, or an orbax directory of ours (``metadata.json`` format)
    with only ``metadata.json``, ``params/`` and ``tokenizer/``."""

    path = Path(path)
    if not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    if is_orbax_dir(path):
        return entries <= ORBAX_ENTRIES
    try:
        meta = read_header(path / WEIGHTS_FILE).metadata
        files = loads_json(meta[FILES_KEY], str(path)) if meta.get(WRITER_KEY) == WRITER else None
    except (OSError, ValueError, KeyError):
        return False
    return isinstance(files, list) and entries <= set(files)


def atomic_model_dir(dst: str | Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp_dir)`` and make the temporary directory ``dst`` (``atomic.atomic_dir``).

    An existing ``dst`` is replaced only with ``overwrite`` and only when these converters wrote
    it (``check_replaceable``); anything else is a FileExistsError and is left untouched.
    """
    dst = Path(dst)
    with atomic_dir(dst, lambda: check_replaceable(dst, overwrite)) as tmp:
        fill(tmp)
    return dst


def write_hf_files(cfg: ModelConfig, params: Params, out: Path, tokenizer=None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) into the existing dir ``out``.

    The weights come last: their metadata records the writer and every file name in ``out``
    (``written_by_converters`` reads it to know that the directory may be replaced).
    """

    def tensors():
        for name, arr in params_to_tensors(cfg, params):
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue  # transformers 5.x omits the tied head
            yield name, np.asarray(arr)

    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg), indent=2, sort_keys=True) + "\n")
    files = sorted({p.name for p in out.iterdir()} | {WEIGHTS_FILE})
    meta = {"format": "pt", WRITER_KEY: WRITER, FILES_KEY: json.dumps(files)}
    write_safetensors(out / WEIGHTS_FILE, tensors(), metadata=meta)


def save_hf_dir(
    cfg: ModelConfig, params: Params, path: str | Path, *, tokenizer=None, overwrite: bool = False
) -> Path:
    """Write a HF directory transformers can load; atomic (temp dir + rename). Returns ``path``."""
    return atomic_model_dir(
        Path(path), overwrite, lambda tmp: write_hf_files(cfg, params, tmp, tokenizer)
    )
