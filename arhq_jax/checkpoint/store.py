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

import arhq_jax.checkpoint.lora as lora
import arhq_jax.checkpoint.out_dir as out_dir
from arhq_jax.checkpoint.schema import (
    WEIGHT_LIMIT,
    CheckpointError,
    check_magnitude,
    decode_linear,
    to_numpy,
)
from arhq_jax.checkpoint.writer import (
    CONFIG_FILE,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    LORA_DIR,
    OWN_LAYOUT_MODEL_TYPE,
    OWN_QUANT_METHOD,
    STORAGE_DTYPES,
    WEIGHTS_FILE,
    quantization_config,
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
from arhq_jax.storage.jsonio import read_json
from arhq_jax.storage.paths import files_in, links_in
from converters.hf import check_config_values, check_index_matches, index_shards, weight_files
from converters.registry import source_kind
from converters.safetensors_io import SafetensorsReader

MANIFEST = out_dir.MANIFEST
_DTYPES = ("float32", "bfloat16", "float16")
NORMS = ("input_norm", "post_norm")

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "check_out",
    "describe",
    "fingerprint",
    "fingerprint_of",
    "load",
    "read_meta",
    "save",
    "source_storage",
    "tree_nbytes",
    "with_factor_dtype",
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


# ----------------------------------------------------------------------------- storage dtype

# A source tensor's stored type → the float dtype that holds its values exactly. GGUF's
# block-quantized types (Q4_1, Q8_0, K-quants...) decode to products of f16 scales and small
# integers, which float16 and bfloat16 do not hold in general: float32 (as ggml decodes them).
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_GGUF_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class SourceStorage:
    """How a source model is stored: ``dtype``, the float dtype holding most of its parameters
    (each tensor's stored type mapped to the float dtype that holds it exactly; a tie is
    float32), the checkpoint's default storage dtype; ``nbytes``, the bytes of its tensors as
    stored (None when not known: an orbax directory); ``what``, its types for messages."""

    dtype: str
    nbytes: int | None
    what: str


def source_storage(source) -> SourceStorage:
    """``SourceStorage`` of a model source as ``--model`` names it ("smollm2", a HF directory,
    a ``.gguf`` file, an orbax directory); read from the file headers only.

    A bf16 safetensors model gives bfloat16, a float16 one float16; SmolLM2's GGUF (Q4_1
    projections, a Q8_0 embedding, F32 norms) gives float32."""
    kind, path = source_kind(source)
    counts: dict[str, int] = {}
    types: dict[str, int] = {}
    nbytes = 0
    if kind == "hf":
        with SafetensorsReader(weight_files(path)) as r:
            for name in r.names():
                info = r.info(name)
                n = int(np.prod(info.shape))
                dt = _SAFETENSORS_DTYPES.get(info.dtype, "float32")
                counts[dt] = counts.get(dt, 0) + n
                types[info.dtype] = types.get(info.dtype, 0) + n
                nbytes += info.end - info.begin
        what = "safetensors"
    elif kind == "gguf":
        from gguf import GGUFReader

        for t in GGUFReader(str(path)).tensors:
            n, tname = int(t.n_elements), t.tensor_type.name
            dt = _GGUF_DTYPES.get(tname, "float32")
            counts[dt] = counts.get(dt, 0) + n
            types[tname] = types.get(tname, 0) + n
            nbytes += int(t.n_bytes)
        what = "GGUF"
    else:
        return SourceStorage("float32", None, "orbax")
    top = max(counts.values(), default=0)
    best = [dt for dt, n in counts.items() if n == top]
    dtype = best[0] if len(best) == 1 else "float32"
    listed = ", ".join(sorted(types, key=lambda k: -types[k]))
    return SourceStorage(dtype, nbytes, f"{what} {listed}")


def with_factor_dtype(qcfg, dtype: str):
    """The recipe with its low-rank factors stored in ``dtype`` (the checkpoint's storage dtype)
    when it has factors and leaves their dtype open (``factor_dtype`` None, which would keep
    the f32 of the quantized model): the method then recomputes the residual from the rounded
    factors, so the checkpoint holds exactly the model the residual was fitted to. A recipe
    with its own ``factor_dtype`` (the best-w4a4 preset: bfloat16) keeps it; so does float32."""
    if dtype == "float32" or getattr(qcfg, "factor_dtype", None) is not None:
        return qcfg
    if not hasattr(qcfg.options, "factor_dtype") or "factor_dtype" in qcfg.options.unused(qcfg):
        return qcfg
    return qcfg.replace(factor_dtype=dtype)


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
    card=None,
    dtype: str | None = None,
) -> int:
    """Write ``params`` (float or quantized) as a checkpoint directory ``path``.

    Args:
      quant: the recipe (method, settings, formats…), recorded as data.
      tokenizer: a transformers tokenizer to store beside the weights, or None.
      source: ``{"model": str, "fingerprint": fingerprint(cfg, float_params)}`` of the model the
        checkpoint was made from (checked on load), or None.
      max_shard_bytes: shard ``model.safetensors`` past this many bytes.
      card: a ``model_card.Card`` (command, preset, diagnostics…): then ``provenance.json``,
        ``diagnostics.json`` and the ``README.md`` model card are written too.
      dtype: storage dtype of the float parameters (embedding, norms, dense weights, biases;
        ``writer.CheckpointWriter``), declared in ``config.json``; None keeps ``params``'.

    Returns:
      The bytes of the stored tensors (model and adapter).
    Raises:
      FileExistsError: ``path`` exists and is not an arhq-jax checkpoint (nothing is touched).
    """

    if len(params.layers) != cfg.num_layers:
        raise ValueError(f"params have {len(params.layers)} layers, config says {cfg.num_layers}")
    with writing(path, max_shard_bytes, dtype) as w:
        w.add(EMBED, to_numpy(params.embed))
        for i, layer in enumerate(params.layers):
            w.add_layer(i, layer)
        w.add(FINAL_NORM, to_numpy(params.final_norm))
        if params.lm_head is not None:
            w.add_linear("lm_head", params.lm_head)
        return w.finish(cfg, quant=quant, tokenizer=tokenizer, source=source, card=card)


def check_out(path) -> None:
    """Raise FileExistsError unless ``path`` may become a checkpoint (absent, empty, or one of
    ours); call it before long work so that a refused ``--out`` costs nothing."""
    out_dir.check_replaceable(Path(path).absolute(), FORMAT)


def describe(path) -> str:
    """One line saying who can read the checkpoint at ``path`` (after ``save``)."""
    hf = read_json(Path(path) / CONFIG_FILE)
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
    """The checkpoint's ``config.json`` after the directory check (``check_directory``)."""
    path = Path(path)
    check_directory(path)
    cfg_file = path / CONFIG_FILE
    hf = _json(cfg_file)
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


def _json(f: Path):
    try:
        return read_json(f)
    except ValueError as e:  # JSONFileError: not JSON, not UTF-8, nested too deeply
        raise CheckpointError(str(e)) from None


def check_directory(path: Path) -> dict:
    """The manifest vouches for the whole directory, or a one-line ``CheckpointError``.

    - the manifest is JSON of the checkpoint format (nesting limited: ``storage.jsonio``);
    - the directory holds no symlinks (a checkpoint is regular files only: a link could lead
      out of it);
    - every file the manifest lists is present, regular, of its size and sha256
      (``out_dir.verify``), and every file present is listed (an added file is refused);
    - the required files are there: ``config.json``; ``model.safetensors`` or the index and the
      shards it names (plain names: ``storage.paths``), and no other ``.safetensors`` file;
      ``lora/`` (when present) holds exactly the adapter's config and weights.

    Returns the manifest's ``{relative name: {"sha256", "bytes"}}``.
    """
    manifest = path / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        raise CheckpointError(f"not an arhq-jax checkpoint: {manifest} is missing")
    _json(manifest)  # a one-line error for deep or broken JSON before out_dir reads it
    links = links_in(path)
    if links:
        raise CheckpointError(
            f"{path / links[0]}: a symlink inside a checkpoint (refused: a checkpoint holds only "
            "regular files)"
        )
    listed = out_dir.verify(path, FORMAT)
    present = set(files_in(path)) - {MANIFEST}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise CheckpointError(
            f"{path / unlisted[0]}: not listed in {MANIFEST} (a file added to the checkpoint; "
            "the manifest vouches for every file)"
        )
    if CONFIG_FILE not in listed:
        raise CheckpointError(f"{path}: {CONFIG_FILE} is not listed in {MANIFEST}")
    top = {f for f in listed if "/" not in f}
    if INDEX_FILE in top:
        if WEIGHTS_FILE in top:
            raise CheckpointError(f"{path}: both {WEIGHTS_FILE} and {INDEX_FILE}; one or the other")
        try:
            weights = set(index_shards(path))
        except (ValueError, OSError) as e:
            raise CheckpointError(str(e)) from None
    elif WEIGHTS_FILE in top:
        weights = {WEIGHTS_FILE}
    else:
        raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} in {MANIFEST}")
    stray = sorted(f for f in top if f.endswith(".safetensors") and f not in weights)
    if stray:
        raise CheckpointError(f"{path / stray[0]}: a weight file the checkpoint does not use")
    in_lora = {f for f in listed if f.startswith(LORA_DIR + "/")}
    want = {f"{LORA_DIR}/{lora.ADAPTER_CONFIG}", f"{LORA_DIR}/{lora.ADAPTER_WEIGHTS}"}
    if in_lora and in_lora != want:
        odd = sorted(in_lora ^ want)[0]
        raise CheckpointError(f"{path}/{LORA_DIR}: must hold exactly {sorted(want)} ({odd!r})")
    if any("/" in f for f in set(listed) - in_lora):
        other = sorted(f for f in set(listed) - in_lora if "/" in f)[0]
        raise CheckpointError(f"{path / other}: an unexpected subdirectory file")
    return listed


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
    cfg_file = path / CONFIG_FILE
    view = _hf_view(hf, cfg_file)
    try:
        # The models run in f32 or bf16; a float16 checkpoint's parameters are read as stored
        # and computed in its compute dtype (``dtype``).
        cfg = config_from_hf(view, param_dtype=meta["dtype"], dtype=meta["dtype"])
        cfg = cfg.replace(param_dtype=meta["param_dtype"])
        check_config_values(cfg, cfg_file)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    _check_source(path, cfg, meta, expect_config, expect_fingerprint)
    files = _weight_files(path)
    lora_file = path / LORA_DIR / lora.ADAPTER_WEIGHTS
    try:
        with SafetensorsReader(files) as reader, _maybe_reader(lora_file) as lreader:
            if INDEX_FILE in {f.name for f in path.iterdir()}:
                check_index_matches(path, reader)
            if lreader is not None:
                lora.check_adapter_config(
                    _json(path / LORA_DIR / lora.ADAPTER_CONFIG),
                    lora.adapter_ranks(lreader),
                    str(path / LORA_DIR / lora.ADAPTER_CONFIG),
                )
            get, used = _getter(reader, path)
            get_lora, used_lora = (None, set()) if lreader is None else _getter(lreader, lora_file)
            params = _assemble(cfg, meta["modules"], get, get_lora)
            _check_all_used(reader, used, path)
            if lreader is not None:
                _check_all_used(lreader, used_lora, lora_file)
    except CheckpointError:
        raise
    except ValueError as e:  # the safetensors reader's and the index's named errors
        raise CheckpointError(str(e)) from None
    _check_quantization_config(hf, cfg_file)
    return params, cfg, meta["recipe"]


def _hf_view(hf: dict, cfg_file: Path) -> dict:
    """config.json as the model config parser reads it: arhq-jax's own layout stores the model
    type in its section (config.json's ``model_type`` is ``OWN_LAYOUT_MODEL_TYPE``, which
    transformers refuses)."""
    if hf.get("model_type") != OWN_LAYOUT_MODEL_TYPE:
        return hf
    inner = hf["arhq_jax"].get("model_type")
    if not isinstance(inner, str):
        raise CheckpointError(f"{cfg_file}: 'arhq_jax.model_type' must name the model type")
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != OWN_QUANT_METHOD:
        raise CheckpointError(
            f"{cfg_file}: model_type {OWN_LAYOUT_MODEL_TYPE!r} is for arhq-jax's own layout only"
        )
    return {**hf, "model_type": inner}


def _check_quantization_config(hf: dict, cfg_file: Path) -> None:
    """config.json's ``quantization_config`` (what transformers and vLLM decode the weights
    with) must be the one the decoded module entries imply (``writer.quantization_config``):
    method, format, bits, group size, strategy, dynamic flags, ignore list."""
    want = quantization_config(hf["arhq_jax"]["modules"])
    got = hf.get("quantization_config")
    if got != want:
        where = _first_difference(got, want, "quantization_config")
        raise CheckpointError(
            f"{cfg_file}: {where} does not match the tensors (the loader decodes "
            f"{'no quantized linear' if want is None else want['quant_method']}); refused"
        )


def _first_difference(got, want, where: str) -> str:
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want), key=str):
            if got.get(k, _MISSING) != want.get(k, _MISSING):
                return _first_difference(
                    got.get(k, _MISSING), want.get(k, _MISSING), f"{where}.{k}"
                )
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    shown = "absent" if got is _MISSING or got is None else f"{json.dumps(got)[:60]}"
    need = "absent" if want is _MISSING or want is None else f"{json.dumps(want)[:60]}"
    return f"{where} ({shown}, expected {need})"


_MISSING = object()


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
        check_magnitude(x, name, WEIGHT_LIMIT)
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
