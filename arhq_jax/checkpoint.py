"""Quantized checkpoints: an orbax array store plus a JSON description of the model pytree.

Layout of a checkpoint directory::

    DIR/meta.json    format version, model config, quantization recipe, the pytree's structure
    DIR/arrays/      orbax StandardCheckpointer: one flat dict of arrays (uint8 codes, float8
                     scales, f32 tensor scales, factors, float parameters)

The structure is encoded generically: every ``flax.struct`` dataclass node records its class
(restricted to this project's packages) and its fields; arrays become references into the flat
dict (with shape and dtype, so orbax can restore into an abstract tree); static fields (format
specs, shapes) become JSON. So any linear that follows the pytree conventions (``QuantLinear``,
the baselines' linears) saves and loads without code here.

Writes go to a temporary sibling directory that is renamed into place at the end: an interrupted
save leaves no half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from arhq_jax.models.config import ModelConfig, Params

FORMAT_VERSION = 1
_ALLOWED_MODULES = ("arhq_jax.", "pallas_kernels.", "converters.")


# ----------------------------------------------------------------------------- encoding


def _qualname(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str):
    module, _, qual = name.partition(":")
    if not module.startswith(_ALLOWED_MODULES):
        raise ValueError(f"checkpoint refers to a class outside arhq-jax: {name!r}")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _encode(node, arrays: dict):
    """Pytree node → JSON-able structure; arrays are moved into ``arrays``."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        key = f"t{len(arrays):05d}"
        arr = np.asarray(node)
        arrays[key] = arr
        return {"__array__": key, "shape": list(arr.shape), "dtype": arr.dtype.name}
    if isinstance(node, (list, tuple)):
        return {"__seq__": type(node).__name__, "items": [_encode(x, arrays) for x in node]}
    if isinstance(node, dict):
        return {"__dict__": {str(k): _encode(v, arrays) for k, v in node.items()}}
    if dataclasses.is_dataclass(node):
        fields = {f.name: _encode(getattr(node, f.name), arrays) for f in dataclasses.fields(node)}
        return {"__class__": _qualname(node), "fields": fields}
    raise TypeError(f"cannot save a {type(node).__name__} in a checkpoint")


def _decode(obj, arrays: dict):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if "__array__" in obj:
        return arrays[obj["__array__"]]
    if "__seq__" in obj:
        items = [_decode(x, arrays) for x in obj["items"]]
        return tuple(items) if obj["__seq__"] == "tuple" else items
    if "__dict__" in obj:
        return {k: _decode(v, arrays) for k, v in obj["__dict__"].items()}
    cls = _resolve(obj["__class__"])
    return cls(**{k: _decode(v, arrays) for k, v in obj["fields"].items()})


def _abstract(obj, out: dict) -> None:
    """Collect ``{key: ShapeDtypeStruct}`` of every array reference in an encoded structure."""
    if isinstance(obj, dict):
        if "__array__" in obj:
            out[obj["__array__"]] = jax.ShapeDtypeStruct(
                tuple(obj["shape"]), jnp.dtype(obj["dtype"])
            )
            return
        for v in obj.values():
            _abstract(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _abstract(v, out)


# ----------------------------------------------------------------------------- save / load


def tree_nbytes(tree) -> int:
    """Bytes of every array leaf of a pytree (packed codes count as stored)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def save(path, params: Params, cfg: ModelConfig, *, quant: dict | None = None) -> int:
    """Save ``params`` (float or quantized) with its config to the directory ``path``.

    Args:
      quant: the recipe and anything else to record (method, settings, formats, source model).

    Returns:
      The bytes of the stored arrays.
    Raises:
      FileExistsError: ``path`` exists and is not an arhq-jax checkpoint (never overwritten).
    """
    path = Path(path).absolute()
    if path.exists() and not (path / "meta.json").exists():
        raise FileExistsError(f"{path} exists and is not an arhq-jax checkpoint; not overwriting")
    arrays: dict = {}
    structure = _encode(params, arrays)
    meta = {
        "format": "arhq-jax-checkpoint",
        "format_version": FORMAT_VERSION,
        "model_config": dataclasses.asdict(cfg),
        "quant": quant or {},
        "structure": structure,
        "nbytes": int(sum(a.nbytes for a in arrays.values())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "arrays", arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta["nbytes"]


def read_meta(path) -> dict:
    """The checkpoint's ``meta.json``, checked for format and version."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"not an arhq-jax checkpoint: {meta_file} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is truncated or not JSON: {e}") from None
    if meta.get("format") != "arhq-jax-checkpoint":
        raise ValueError(f"{path} is not an arhq-jax checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {meta.get('format_version')}; this arhq-jax "
            f"reads version {FORMAT_VERSION}"
        )
    return meta


def load(path, *, expect_config: ModelConfig | None = None) -> tuple[Params, ModelConfig, dict]:
    """Load a checkpoint → ``(params, cfg, quant)``.

    Args:
      expect_config: if given, the checkpoint must have been made from a model with this
        architecture (dtype fields aside), else ValueError.
    """
    path = Path(path).absolute()
    meta = read_meta(path)
    cfg_dict = dict(meta["model_config"])
    for k, v in cfg_dict.items():
        if isinstance(v, list):
            cfg_dict[k] = _tuplify(v)
    cfg = ModelConfig(**cfg_dict)
    if expect_config is not None:
        ignore = {"param_dtype", "dtype"}
        a = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
        b = {k: v for k, v in dataclasses.asdict(expect_config).items() if k not in ignore}
        if a != b:
            diff = sorted(k for k in a if a[k] != b.get(k))
            raise ValueError(
                f"checkpoint {path} was made from another model (config differs in {diff})"
            )
    abstract: dict = {}
    _abstract(meta["structure"], abstract)
    if not (path / "arrays").is_dir():
        raise FileNotFoundError(f"checkpoint {path} has no arrays/ directory")
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(path / "arrays", abstract)
    params = _decode(meta["structure"], arrays)
    return params, cfg, meta.get("quant", {})


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v
