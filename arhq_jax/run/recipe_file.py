"""Recipe files: a quantization run's settings as YAML, the same keys as ``quantize``'s flags.

A recipe is a mapping of ``RECIPE_KEYS`` (spelled as the flags without ``--``: ``act-format``,
``calib-tokens``; ``act_format`` is accepted too) to values; see docs/recipes.md. In this module
a recipe is a dict keyed by the flags' argparse names (``act_format``) holding only the settings
that were given: ``quant_config`` turns it into a ``QuantConfig`` exactly as the CLI turns its
flags into one, and ``resolved_recipe`` writes back what a run used (every setting resolved, so
the file reproduces the run even if a default changes).

Values are data: read with ``yaml.safe_load`` (no tags, no code), each key checked by the same
parser as its flag; an unknown key or a bad value is a ValueError naming the file and the key.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from arhq_jax.checkpoint.store import STORAGE_DTYPES
from arhq_jax.methods import REGISTRY
from arhq_jax.methods.argtypes import int_at_least
from arhq_jax.run.config import (
    ACT_SCALES,
    COMMON_FIELDS,
    DEFAULT,
    LINEAR_FORMATS,
    MODULES,
    PRESETS,
    QuantConfig,
    _ignore_patterns,
    _override_rules,
    preset,
)
from arhq_jax.storage.atomic import atomic_write

GROUP_MAX = 2**20  # as the CLI's --group-size
# The run settings that are not part of ``QuantConfig`` and their defaults (the CLI's too).
RUN_DEFAULTS = {
    "calib_tokens": 16384,
    "calib_seq_len": 512,
    "batch_size": 8,
    "calib_field": "text",
    "chat_template": False,
    "dtype": None,  # the checkpoint's storage dtype; None: the source's as stored
}
# QuantConfig's common field of each flag (``--format`` is ``w_fmt``).
FIELD_OF = {
    "method": "method",
    "format": "w_fmt",
    "act_format": "act_fmt",
    "modules": "modules",
    "sequential": "sequential",
    "stats_dtype": "stats_dtype",
    "group_size": "group_size",
    "act_group_size": "act_group_size",
    "act_scale": "act_scale",
    "fused_w_scale": "fused_w_scale",
}
assert set(FIELD_OF.values()) == set(COMMON_FIELDS)
CALIB_KEYS = ("calib_dataset", "calib_text", "calib_field", "chat_template")


class _Bad(ValueError):
    """A value that its key's parser refused (the message names no key yet)."""


def _choice(allowed):
    def parse(v):
        if v not in allowed:
            raise _Bad(f"expected one of {', '.join(map(str, allowed))}, got {v!r}")
        return v

    return parse


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {v!r}")
    return v


def _str(v):
    if not isinstance(v, str) or not v:
        raise _Bad(f"expected a non-empty string, got {v!r}")
    return v


def _via(parse):
    """An argparse ``type=`` parser applied to a YAML scalar (numbers as written, never bools)."""

    def run(v):
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise _Bad(f"expected a number, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise _Bad(f"expected a finite number, got {v!r}")
        try:
            return parse(str(v))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise _Bad(str(e)) from None

    return run


def _group(v):
    """A group size: a positive int, -1, or 'row' / 'channel' / 'token' (= -1)."""
    if isinstance(v, str) and v.lower() in ("row", "channel", "token"):
        return -1
    if isinstance(v, bool) or not isinstance(v, int) or not (1 <= v <= GROUP_MAX or v == -1):
        raise _Bad(f"expected an int in [1, {GROUP_MAX}], -1 or 'row', got {v!r}")
    return v


def _act_format(v):
    if v is None or (isinstance(v, str) and v.lower() == "none"):
        return None
    return _choice((DEFAULT, *LINEAR_FORMATS))(v)


def _checked(fn):
    def run(v):
        try:
            return fn(v)
        except ValueError as e:
            raise _Bad(str(e)) from None

    return run


def _option_parser(field):
    cli = dict(field.metadata["cli"])
    action = cli.get("action")
    if action in ("store_true", "BooleanOptionalAction"):
        return _bool
    if "choices" in cli:
        return _choice(tuple(cli["choices"]))
    if "type" in cli:
        return _via(cli["type"])
    return _str


def _keys() -> dict:
    keys = {
        "preset": _choice(tuple(PRESETS)),
        "method": _choice(tuple(REGISTRY.names())),
        "format": _choice((DEFAULT, *LINEAR_FORMATS)),
        "act_format": _act_format,
        "group_size": _group,
        "act_group_size": _group,
        "modules": _choice(tuple(MODULES)),
        "sequential": _bool,
        "stats_dtype": _choice(("float32", "float64")),
        "act_scale": _choice(ACT_SCALES),
        "fused_w_scale": _bool,
    }
    for name, entries in REGISTRY.all_options().items():
        keys[name] = _option_parser(entries[0][1])
    keys.update(
        {
            "ignore": _checked(lambda v: list(_ignore_patterns(v))),
            "overrides": _checked(
                lambda v: [{"match": m, "format": f} for m, f in _override_rules(v)]
            ),
            "calib_tokens": _via(int_at_least(1)),
            "calib_seq_len": _via(int_at_least(2)),
            "batch_size": _via(int_at_least(1)),
            "calib_dataset": _str,
            "calib_text": _str,
            "calib_field": _str,
            "chat_template": _bool,
            "dtype": _choice(STORAGE_DTYPES),
        }
    )
    return keys


def recipe_keys() -> dict:
    """Recipe key (argparse name, e.g. ``act_format``) → its value parser."""
    return _keys()


def flag(key: str) -> str:
    """The spelling of a key in a recipe file and on the command line (without ``--``)."""
    if key in REGISTRY.all_options():
        cli = REGISTRY.all_options()[key][0][1].metadata["cli"]
        if "flag" in cli:
            return cli["flag"].removeprefix("--")
    return key.replace("_", "-")


def check_recipe(recipe: dict, where: str = "recipe") -> dict:
    """``recipe`` (keys as in a file or as keyword arguments) checked key by key → a dict keyed
    by argparse names, values parsed. ``None`` values are left out (the default). ValueError
    naming ``where`` and the key for an unknown key or a bad value."""
    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(recipe).__name__}")
    keys = _keys()
    by_flag = {flag(k): k for k in keys}
    out = {}
    for raw, value in recipe.items():
        if not isinstance(raw, str):
            raise ValueError(f"{where}: key {raw!r} is not a string")
        key = by_flag.get(raw, raw if raw in keys else None)
        if key is None:
            raise ValueError(
                f"{where}: unknown key {raw!r} (keys are quantize's flags without '--', e.g. "
                "method, rank, format, act-format, calib-tokens; see docs/recipes.md)"
            )
        if key in out:
            raise ValueError(f"{where}: key {raw!r} given twice")
        if value is None:
            continue
        try:
            out[key] = keys[key](value)
        except _Bad as e:
            raise ValueError(f"{where}: key {flag(key)!r}: {e}") from None
    if "calib_dataset" in out and "calib_text" in out:
        raise ValueError(f"{where}: give calib-dataset or calib-text, not both")
    return out


def read_recipe(path) -> dict:
    """A recipe file (YAML mapping) → ``check_recipe``'s dict. OSError for a missing or
    unreadable file, ValueError (naming the file) for one that is not a YAML mapping or holds
    an unknown key or a bad value."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"recipe {path} is a directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"recipe {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:200]
        raise ValueError(f"recipe {path} is not valid YAML ({first})") from None
    if data is None:
        data = {}
    return check_recipe(data, f"recipe {path}")


def quant_config(recipe: dict) -> QuantConfig:
    """The ``QuantConfig`` of a checked recipe: a ``preset``'s fields, then the recipe's own
    (explicit keys override the preset's), the other settings at their defaults."""
    kw = {FIELD_OF.get(k, k): v for k, v in recipe.items() if k in _quant_keys()}
    if "preset" in recipe:
        return preset(recipe["preset"], **kw)
    return QuantConfig(**kw)


def _quant_keys() -> set:
    return set(FIELD_OF) | set(REGISTRY.all_options()) | {"ignore", "overrides"}


def run_setting(recipe: dict, key: str):
    """A run setting (``RUN_DEFAULTS``) of a recipe, or its default."""
    return recipe.get(key, RUN_DEFAULTS.get(key))


def resolved_recipe(qcfg: QuantConfig, recipe: dict) -> dict:
    """What a run used, as a recipe: every field of ``qcfg`` (resolved: ``to_dict``, None
    values left out) and the run settings (calibration and batch). ``quant_config`` of it is
    ``qcfg``."""
    d = qcfg.to_dict()
    inv = {v: k for k, v in FIELD_OF.items()}
    out = {}
    for k, v in d.items():
        key = inv.get(k, k)
        if key == "act_format" and v is None:
            v = "none"
        if v is not None:
            out[key] = v
    for k in ("calib_tokens", "calib_seq_len", "batch_size"):
        out[k] = run_setting(recipe, k)
    if run_setting(recipe, "dtype") is not None:
        out["dtype"] = recipe["dtype"]
    for k in CALIB_KEYS:
        if k in recipe and recipe[k] != RUN_DEFAULTS.get(k):
            out[k] = recipe[k]
    return out


def recipe_yaml(recipe: dict, comment: str | None = None) -> str:
    """A recipe as YAML text (keys spelled as flags, in the order given)."""
    body = yaml.safe_dump(
        {flag(k): v for k, v in recipe.items()}, sort_keys=False, default_flow_style=False
    )
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    return head + body


def check_new_file(path) -> Path:
    """``path`` for a new recipe file: FileExistsError if something is there (a file this
    program did not write is never replaced), FileNotFoundError if its directory is missing."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists; give a new file name for the recipe")
    if not path.absolute().parent.is_dir():
        raise FileNotFoundError(f"directory of {path} not found")
    return path


def write_recipe(path, recipe: dict, comment: str | None = None) -> Path:
    """Write ``recipe_yaml`` atomically to a new file ``path`` (``check_new_file``)."""
    path = check_new_file(path)
    atomic_write(path, recipe_yaml(recipe, comment).encode())
    return path
