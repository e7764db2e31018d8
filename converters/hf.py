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
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file}: not a JSON object")
    try:
        family_of(d)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return d


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a HF directory: the index's shards, or ``model.safetensors``."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (listed in {index})")
        return files
    single = path / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: neither {WEIGHTS_FILE} nor {INDEX_FILE}")


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
    files = weight_files(path)
    with SafetensorsReader(files) as reader:
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
        files = json.loads(meta[FILES_KEY]) if meta.get(WRITER_KEY) == WRITER else None
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
