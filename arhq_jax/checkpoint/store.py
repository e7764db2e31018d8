"""Quantized checkpoints: Hugging Face directories in the ecosystem's own layout.

See docs/checkpoint.md for every tensor name, dtype and shape.

::

    DIR/config.json        the model's HF config + ``quantization_config`` (compressed-tensors'
                           nvfp4-pack-quantized when every quantized linear is expressible in it,
                           else ``{"quant_method": "arhq-jax"}``) + ``arhq_jax``: format version,
                           recipe, source fingerprint, one entry per linear (checkpoint_schema)
    DIR/model.safetensors  HF tensor names (sharded with model.safetensors.index.json past
                           ``max_shard_bytes``)
    DIR/lora/              the low-rank branches as a PEFT LoRA adapter (lora_A = Aᵀ, lora_B = B,
                           scaling 1), when any linear has one
    DIR/tokenizer files    when the source has a tokenizer
    DIR/manifest.json      the marker, and the sha256 and size of every other file

Loading verifies the manifest first (a changed, missing, extra or truncated file is a named
``CheckpointError``), then decodes field by field (``checkpoint_schema``): nothing read from the
files is ever resolved to code. Saving writes into a temporary sibling directory renamed into
place at the end (``out_dir``), so nothing is left half-written and nothing the program did not
write is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import arhq_jax.checkpoint.out_dir as out_dir
from arhq_jax.checkpoint.schema import CheckpointError, decode_linear, to_numpy
from arhq_jax.checkpoint.writer import (
    CONFIG_FILE,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    LORA_DIR,
    writing,
)
from arhq_jax.linears.base import Dense
from arhq_jax.models import config_from_hf
from arhq_jax.models.config import PROJECTIONS, Layer, ModelConfig, Params
from arhq_jax.models.params import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    expected_tensors,
    has_bias,
    linear_key,
    norm_key,
)
from converters.hf import weight_files
from converters.safetensors_io import SafetensorsReader

MANIFEST = out_dir.MANIFEST
_DTYPES = ("float32", "bfloat16", "float16")
NORMS = ("input_norm", "post_norm")

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "check_out",
    "describe",
    "fingerprint",
    "fingerprint_of",
    "load",
    "read_meta",
    "save",
    "tree_nbytes",
]


# ----------------------------------------------------------------------------- provenance


def fingerprint(cfg: ModelConfig, params: Params) -> dict:
    """The source model's identity: a digest of its architecture and of its weights.

    The weight digest hashes every tensor's name, shape and a strided sample of at most 4,096 of
    its values as f32 (cheap for a 70B model, and independent of the parameter dtype for
    bf16-representable weights): it tells one model from another of the same shapes.
    """

    def samples():
        for name, x in _float_tensors(cfg, params):
            x = np.asarray(jax.device_get(x)).reshape(-1)
            yield name, x.size, x[:: max(1, x.size // 4096)].astype(np.float32)

    return fingerprint_of(cfg, samples())


def fingerprint_of(cfg: ModelConfig, samples) -> dict:
    """``fingerprint`` from ``(name, size, f32 sample)`` triples in ``_float_tensors`` order (a
    lazy source gives them without loading the model: ``converters.lazy``)."""
    arch = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("param_dtype", "dtype")}
    h = hashlib.sha256()
    for name, size, sample in samples:
        h.update(f"{name}:{[int(size)]}".encode())
        h.update(np.ascontiguousarray(sample, np.float32).tobytes())
    return {
        "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
    }


def _float_tensors(cfg: ModelConfig, params: Params):
    yield EMBED, params.embed
    for i, layer in enumerate(params.layers):
        for n in ("input_norm", "post_norm", "q_norm", "k_norm"):
            if getattr(layer, n, None) is not None:
                yield norm_key(i, n), getattr(layer, n)
        for p in PROJECTIONS:
            lin = getattr(layer, p)
            if isinstance(lin, Dense):
                yield linear_key(i, p) + ".weight", lin.w
    yield FINAL_NORM, params.final_norm
    if isinstance(params.lm_head, Dense):
        yield LM_HEAD, params.lm_head.w


# ----------------------------------------------------------------------------- save


def tree_nbytes(tree) -> int:
    """Bytes of every array leaf of a pytree (packed codes count as stored)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _linears(cfg: ModelConfig, params: Params):
    for i, layer in enumerate(params.layers):
        for p in PROJECTIONS:
            yield linear_key(i, p), getattr(layer, p)
    if params.lm_head is not None:
        yield "lm_head", params.lm_head


def save(
    path,
    params: Params,
    cfg: ModelConfig,
    *,
    quant: dict | None = None,
    tokenizer=None,
    source: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> int:
    """Write ``params`` (float or quantized) as a checkpoint directory ``path``.

    Args:
      quant: the recipe (method, settings, formats…), recorded as data.
      tokenizer: a transformers tokenizer to store beside the weights, or None.
      source: ``{"model": str, "fingerprint": fingerprint(cfg, float_params)}`` of the model the
        checkpoint was made from (checked on load), or None.
      max_shard_bytes: shard ``model.safetensors`` past this many bytes.

    Returns:
      The bytes of the stored tensors (model and adapter).
    Raises:
      FileExistsError: ``path`` exists and is not an arhq-jax checkpoint (nothing is touched).
    """

    if len(params.layers) != cfg.num_layers:
        raise ValueError(f"params have {len(params.layers)} layers, config says {cfg.num_layers}")
    with writing(path, max_shard_bytes) as w:
        w.add(EMBED, to_numpy(params.embed))
        for i, layer in enumerate(params.layers):
            w.add_layer(i, layer)
        w.add(FINAL_NORM, to_numpy(params.final_norm))
        if params.lm_head is not None:
            w.add_linear("lm_head", params.lm_head)
        return w.finish(cfg, quant=quant, tokenizer=tokenizer, source=source)


def check_out(path) -> None:
    """Raise FileExistsError unless ``path`` may become a checkpoint (absent, empty, or one of
    ours); call it before long work so that a refused ``--out`` costs nothing."""
    out_dir.check_replaceable(Path(path).absolute(), FORMAT)


def describe(path) -> str:
    """One line saying who can read the checkpoint at ``path`` (after ``save``)."""
    hf = json.loads((Path(path) / CONFIG_FILE).read_text())
    kinds: dict[str, int] = {}
    for e in hf["arhq_jax"]["modules"].values():
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    lora = " + LoRA adapter lora/" if (Path(path) / LORA_DIR).is_dir() else ""
    qc = hf.get("quantization_config", {}).get("quant_method")
    if qc == "compressed-tensors":
        return f"compressed-tensors nvfp4-pack-quantized{lora} ({counts}): transformers, vLLM"
    if qc is None:
        return f"float safetensors ({counts})"
    return f"arhq-jax's own layout{lora} ({counts}): only arhq-jax reads it (docs/checkpoint.md)"


# ----------------------------------------------------------------------------- load


def read_meta(path) -> dict:
    """The checkpoint's ``config.json`` after the manifest check: every file's sha256."""
    path = Path(path)
    out_dir.verify(path, FORMAT)
    cfg_file = path / CONFIG_FILE
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not JSON: {e}") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("arhq_jax"), dict):
        raise CheckpointError(f"{cfg_file}: no 'arhq_jax' section (not an arhq-jax checkpoint)")
    meta = hf["arhq_jax"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; this arhq-jax "
            f"reads version {FORMAT_VERSION}"
        )
    for key, typ in (("modules", dict), ("recipe", dict), ("source", dict)):
        if not isinstance(meta.get(key), typ):
            raise CheckpointError(f"{cfg_file}: 'arhq_jax.{key}' must be a JSON object")
    for key in ("param_dtype", "dtype"):
        if meta.get(key) not in _DTYPES:
            raise CheckpointError(f"{cfg_file}: 'arhq_jax.{key}' must be one of {_DTYPES}")
    return hf


def load(
    path,
    *,
    expect_config: ModelConfig | None = None,
    expect_fingerprint: dict | None = None,
) -> tuple[Params, ModelConfig, dict]:
    """Load a checkpoint → ``(params, cfg, recipe)``.

    Args:
      expect_config: if given, the checkpoint must have been made from a model with this
        architecture (dtype fields aside).
      expect_fingerprint: if given, the recorded source fingerprint must equal it.
    Raises:
      CheckpointError (a ValueError) naming the problem; FileNotFoundError for a missing dir.
    """

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    hf = read_meta(path)
    meta = hf["arhq_jax"]
    try:
        cfg = config_from_hf(hf, param_dtype=meta["param_dtype"], dtype=meta["dtype"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    _check_source(path, cfg, meta, expect_config, expect_fingerprint)
    files = _weight_files(path)
    lora_file = path / LORA_DIR / "adapter_model.safetensors"
    try:
        with SafetensorsReader(files) as reader, _maybe_reader(lora_file) as lreader:
            get, used = _getter(reader, path)
            get_lora, used_lora = (None, set()) if lreader is None else _getter(lreader, lora_file)
            params = _assemble(cfg, meta["modules"], get, get_lora)
            _check_all_used(reader, used, path)
            if lreader is not None:
                _check_all_used(lreader, used_lora, lora_file)
    except CheckpointError:
        raise
    except ValueError as e:  # the safetensors reader's named errors
        raise CheckpointError(str(e)) from None
    return params, cfg, meta["recipe"]


def _check_source(path, cfg, meta, expect_config, expect_fingerprint) -> None:
    if expect_config is not None:
        ignore = {"param_dtype", "dtype"}
        a = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
        b = {k: v for k, v in dataclasses.asdict(expect_config).items() if k not in ignore}
        if a != b:
            diff = sorted(k for k in a if a[k] != b.get(k))
            raise CheckpointError(
                f"checkpoint {path} was made from another model (config differs in {diff})"
            )
    if expect_fingerprint is not None:
        got = meta["source"].get("fingerprint")
        if got != expect_fingerprint:
            what = meta["source"].get("model", "an unrecorded model")
            raise CheckpointError(
                f"checkpoint {path} was made from another model ({what!s:.80}: its weights "
                "digest differs from --model's); pass --allow-other-source to use it anyway"
            )


def _weight_files(path: Path) -> list[Path]:

    try:
        return weight_files(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


class _NoReader:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _maybe_reader(file: Path):

    return SafetensorsReader([file]) if file.is_file() else _NoReader()


def _getter(reader, where):
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        x = reader.get(name)
        if x is None:
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        used.add(name)
        return np.asarray(x)

    return get, used


def _check_all_used(reader, used: set, where) -> None:
    extra = [n for n in reader.names() if n not in used]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{where}: unexpected tensors {', '.join(extra[:3])}{more}")


def _assemble(cfg: ModelConfig, modules: dict, get, get_lora) -> Params:

    pdt = jnp.dtype(cfg.param_dtype).name
    shapes = cfg.linear_shapes()
    hf_shapes = expected_tensors(cfg)

    def tensor(name):
        shape = hf_shapes[name]
        x = get(name)
        if x.dtype.name != pdt or tuple(x.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r}: {x.dtype.name}{list(x.shape)}, expected {pdt}{list(shape)}"
            )
        if not np.isfinite(x.astype(np.float32)).all():
            raise CheckpointError(f"tensor {name!r} has non-finite values")
        return jnp.asarray(x)

    def linear(prefix, shape, bias):
        if prefix not in modules:
            raise CheckpointError(f"config.json: no entry for module {prefix!r}")
        return decode_linear(prefix, modules[prefix], get, get_lora, shape, pdt if bias else None)

    expected = {linear_key(i, p) for i in range(cfg.num_layers) for p in PROJECTIONS}
    extra = set(modules) - expected - {"lm_head"}
    if extra:
        raise CheckpointError(f"config.json: unknown modules {sorted(extra)[:3]}")
    embed = tensor(EMBED)
    norms = ("input_norm", "post_norm", "q_norm", "k_norm") if cfg.qk_norm else NORMS
    layers = []
    for i in range(cfg.num_layers):
        kw = {n: tensor(norm_key(i, n)) for n in norms}
        for p in PROJECTIONS:
            kw[p] = linear(linear_key(i, p), shapes[p], has_bias(cfg, p))
        layers.append(Layer(**kw))
    final_norm = tensor(FINAL_NORM)
    lm_head = None
    if "lm_head" in modules:
        lm_head = linear("lm_head", (cfg.vocab_size, cfg.hidden_size), False)
    elif not cfg.tie_word_embeddings:
        raise CheckpointError("config.json: the model has an lm_head but no entry for it")
    return Params(embed=embed, layers=tuple(layers), final_norm=final_norm, lm_head=lm_head)
