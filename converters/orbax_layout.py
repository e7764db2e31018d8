"""The layout of an orbax float checkpoint directory (constants and the marker test), without the
orbax dependency, so that the HF writer can recognize one (``written_by_converters``)."""

from __future__ import annotations

from pathlib import Path

from arhq_jax.storage.jsonio import read_json

FORMAT = "arhq-jax-float-params"
VERSION = 1
METADATA_FILE = "metadata.json"
# Everything ``write_orbax_files`` puts in a directory.
ORBAX_ENTRIES = frozenset({METADATA_FILE, "params", "tokenizer"})


def is_orbax_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``save_orbax``."""
    f = Path(path) / METADATA_FILE
    if not f.is_file():
        return False
    try:
        return read_json(f).get("format") == FORMAT
    except (ValueError, AttributeError, OSError):
        return False
