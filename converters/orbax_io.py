"""Float parameters + config in an orbax checkpoint directory (docs/spec/models.md §5).

Layout of ``DIR``::

    DIR/metadata.json   {"format": "arhq-jax-float-params", "version": 1, "config": {...}}
    DIR/params/         orbax StandardCheckpointer tree: {HF tensor name: array}
    DIR/tokenizer/      optional, ``tokenizer.save_pretrained``

The tree is keyed by HF tensor names, so it does not depend on the ``Params`` class layout and is
rebuilt through the same ``params_from_tensors`` path as safetensors (shape checks included).
Written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from arhq_jax.models.config import ModelConfig, Params, config_from_dict, config_to_dict  # noqa: F401
from arhq_jax.models.params import params_to_tensors
from arhq_jax.storage.jsonio import read_json
from converters.hf import atomic_model_dir, params_from_getter
from converters.orbax_layout import (  # noqa: F401 (public here too)
    FORMAT,
    METADATA_FILE,
    ORBAX_ENTRIES,
    VERSION,
    is_orbax_dir,
)


def write_orbax_files(cfg: ModelConfig, params: Params, out: Path, tokenizer=None) -> None:
    """Fill the existing (empty) directory ``out``."""
    import orbax.checkpoint as ocp

    tree = {name: np.asarray(a) for name, a in params_to_tensors(cfg, params)}
    if cfg.tie_word_embeddings:
        tree.pop("lm_head.weight", None)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out.absolute() / "params", tree)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "version": VERSION, "config": config_to_dict(cfg)}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))


def save_orbax(
    cfg: ModelConfig, params: Params, path: str | Path, *, tokenizer=None, overwrite: bool = False
) -> Path:
    """Save float params + config (+ tokenizer) to the orbax directory ``path``, atomically."""

    return atomic_model_dir(
        Path(path), overwrite, lambda tmp: write_orbax_files(cfg, params, tmp, tokenizer)
    )


def read_orbax_metadata(path: str | Path) -> dict:
    path = Path(path)
    f = path / METADATA_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found (not an arhq-jax orbax checkpoint)")
    meta = read_json(f)
    if not isinstance(meta, dict):
        raise ValueError(f"{f}: not a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{f}: version {meta.get('version')}, this reader knows {VERSION}")
    return meta


def load_orbax(
    path: str | Path, *, param_dtype: str | None = None, dtype: str | None = None
) -> tuple[ModelConfig, Params]:
    """Restore ``(cfg, params)``; ``param_dtype``/``dtype`` None keep the stored ones."""
    import orbax.checkpoint as ocp

    path = Path(path)
    cfg = config_from_dict(read_orbax_metadata(path)["config"])
    if param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    elif dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    ckpt = path.absolute() / "params"
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt} not found (orbax parameter tree)")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            item = ckptr.metadata(ckpt).item_metadata
            if item is None or not isinstance(item.tree, dict):
                raise ValueError("no parameter tree in its metadata")
            # Restore onto abstract arrays of the stored shapes and dtypes (no restore warning).
            target = {k: _sds(m) for k, m in item.tree.items()}
            tree = ckptr.restore(ckpt, target)
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            # orbax / tensorstore on a truncated or corrupt file (RuntimeError: tensorstore's).
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ValueError(
                f"{ckpt}: unreadable orbax checkpoint, truncated or corrupt ({first})"
            ) from None

    def get(name):
        a = tree.get(name)
        return None if a is None else np.asarray(a)

    params = params_from_getter(cfg, get, list(tree), path)
    return cfg, params


def _sds(m):

    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
