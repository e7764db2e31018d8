"""JSON read from files, parsed with a nesting limit: a one-line ``JSONFileError`` for a file
that is not JSON, not UTF-8 or nested deeper than ``MAX_DEPTH`` (the json module itself fails on
deep nesting with a RecursionError, which no caller expects). Every JSON file the loaders read
(checkpoint config and manifest, adapter config, safetensors headers, HF configs and indexes)
goes through ``loads_json`` / ``read_json``.
"""

from __future__ import annotations

import json
from pathlib import Path

# The deepest JSON our files hold is ~6 levels (a checkpoint's module entry); HF configs ~4.
MAX_DEPTH = 64


class JSONFileError(ValueError):
    """A file (or part of one) that should hold JSON and does not, or is nested too deeply."""


def _depth_ok(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            continue
        if d > limit:
            return False
        stack.extend((v, d + 1) for v in o)
    return True


def loads_json(text, where: str, max_depth: int = MAX_DEPTH):
    """Parse ``text`` (str or bytes); ``where`` names the source in errors."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise JSONFileError(f"{where}: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONFileError(f"{where}: invalid JSON: {e}") from None
    if not _depth_ok(obj, max_depth):
        raise JSONFileError(f"{where}: JSON nested deeper than {max_depth} levels")
    return obj


def read_json(path, max_depth: int = MAX_DEPTH):
    """The JSON document in file ``path`` (FileNotFoundError when absent)."""
    path = Path(path)
    return loads_json(path.read_bytes(), str(path), max_depth)
