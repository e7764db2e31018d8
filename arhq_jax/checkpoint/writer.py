"""The checkpoint writer: a checkpoint directory written tensor by tensor (see ``checkpoint``).

``writing(path)`` yields a ``CheckpointWriter`` into a temporary directory that becomes ``path``
at the end (``out_dir.replacing``). ``checkpoint.save`` (a model in memory) and
``arhq_jax.run.stream`` (a model streamed from disk) both write through it, so one code path decides
every file's bytes: tensor order, shards, the ``config.json`` entries and the LoRA adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

import arhq_jax.checkpoint.model_card as model_card
import arhq_jax.checkpoint.nvfp4_pack as ct_nvfp4
import arhq_jax.checkpoint.out_dir as out_dir
from arhq_jax.checkpoint.lora import AdapterWriter
from arhq_jax.checkpoint.schema import cast_encoded, cast_param, encode_linear, to_numpy
from arhq_jax.models import config_to_hf
from arhq_jax.models.config import PROJECTIONS, Layer, ModelConfig
from arhq_jax.models.params import linear_key, norm_key
from converters.safetensors_io import SafetensorsWriter

FORMAT = "arhq-jax-checkpoint"
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "lora"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
# config.json's model_type for arhq-jax's own layout: transformers (and vLLM, which reads configs
# through it) refuse an unknown model type with an error naming it, where an unknown
# quant_method is only a warning followed by a model with every projection randomly initialised.
# The model's own type is kept in the "arhq_jax" section.
OWN_LAYOUT_MODEL_TYPE = "arhq-jax"
OWN_QUANT_METHOD = "arhq-jax"
# Recipe keys that describe one run rather than the checkpoint (they go to the log): leaving them
# out makes two identical runs write identical bytes.
RUN_ONLY_KEYS = ("timings",)


@contextlib.contextmanager
def writing(path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None):
    """Yield a ``CheckpointWriter`` into a temporary directory that becomes ``path`` once the
    block ends after ``finish`` (``out_dir.replacing``: nothing half-written, nothing foreign
    touched); ``dtype``: the storage dtype of the float parameters (``CheckpointWriter``).
    Raises FileExistsError for a foreign ``path``."""
    with out_dir.replacing(path, FORMAT, FORMAT_VERSION) as tmp:
        w = CheckpointWriter(tmp, max_shard_bytes, dtype)
        w.out = Path(path)  # the model card's default name for the directory
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        if not w.finished:
            w.abort()
            raise RuntimeError("checkpoint writer left without finish()")


class CheckpointWriter:
    """A checkpoint written tensor by tensor, in checkpoint order: the embedding, each layer
    (norms, then projections), the final norm, the lm_head; then ``finish`` (config, adapter,
    tokenizer). Only the tensor being added is in memory; big dense tensors can come in row
    blocks (``add_blocks``). ``save`` and the streaming quantizer both write through it.

    ``dtype`` ("float32", "bfloat16", "float16"; None: as given) is the storage dtype of the float
    parameters: the embedding, the norms, dense weights (an unquantized lm_head) and biases are
    rounded to it here, and ``config.json`` declares it (``dtype``, ``arhq_jax.param_dtype``).
    The model is quantized in f32 before; the low-rank factors come in the dtype the method
    stored them in (its ``factor_dtype``), the codes and scales in their formats' dtypes."""

    def __init__(
        self, tmp: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None
    ):
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {dtype!r}; supported: {', '.join(STORAGE_DTYPES)}")
        self.tmp, self.max_shard_bytes, self.dtype = Path(tmp), max_shard_bytes, dtype
        self.shards: list[SafetensorsWriter] = []
        self.modules: dict = {}
        self.kinds: dict = {}
        self.nbytes = 0
        self.finished = False
        self._adapter: AdapterWriter | None = None

    def _shard(self, nbytes: int) -> SafetensorsWriter:
        last = self.shards[-1] if self.shards else None
        if last is None or (last.nbytes and last.nbytes + nbytes > self.max_shard_bytes):
            name = f".shard-{len(self.shards):05d}.safetensors"
            self.shards.append(SafetensorsWriter(self.tmp / name))
        self.nbytes += nbytes
        return self.shards[-1]

    def add(self, name: str, arr) -> None:
        """One float parameter (the embedding, a norm), in the storage dtype."""
        self._add(name, cast_param(arr, self.dtype, name))

    def _add(self, name: str, arr) -> None:
        arr = np.asarray(arr)
        self._shard(arr.nbytes).add(name, arr)

    def add_blocks(self, name: str, dtype, shape, blocks) -> None:
        """One float parameter of ``shape`` (the embedding, a dense lm_head) from consecutive row
        blocks (``blocks``, in ``dtype``), stored in the storage dtype."""
        if self.dtype is not None:
            dtype = self.dtype
            blocks = (cast_param(b, dtype, name) for b in blocks)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._shard(nbytes).add_chunks(name, dtype, shape, blocks)

    def add_layer(self, i: int, layer: Layer) -> None:
        """Decoder layer ``i``: its norms, then every projection (``encode_linear``)."""
        for name, arr, prefix, enc in layer_records(i, layer):
            if enc is None:
                self.add(name, arr)
            else:
                self.add_encoded(prefix, enc.entry, enc.tensors, enc.lora)

    def add_linear(self, prefix: str, lin) -> None:
        enc = encode_linear(prefix, lin)
        self.add_encoded(prefix, enc.entry, enc.tensors, enc.lora)

    def add_encoded(self, prefix: str, entry: dict, tensors, lora) -> None:
        """A linear already encoded: its ``config.json`` entry, model tensors, adapter tensors
        (its float parameters rounded to the storage dtype: ``schema.cast_encoded``)."""
        entry, tensors = cast_encoded(prefix, entry, tensors, self.dtype)
        for name, arr in tensors:
            self._add(name, arr)
        for name, arr in lora:
            if self._adapter is None:
                self._adapter = AdapterWriter(self.tmp / LORA_DIR)
            self._adapter.add(name, arr)
        self.modules[prefix] = entry
        kind = entry["kind"]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if kind != "dense":
            self.kinds["quantized"] = self.kinds.get("quantized", 0) + 1

    def finish(
        self, cfg: ModelConfig, *, quant=None, tokenizer=None, source=None, card=None
    ) -> int:
        """Close the shards, write the adapter, config.json, tokenizer, generation config and,
        given a ``model_card.Card``, the provenance, diagnostics and model card → tensor
        bytes."""
        _close_shards(self.tmp, self.shards)
        nbytes = self.nbytes
        if self._adapter is not None:
            nbytes += self._adapter.close(base_model=(source or {}).get("model"))
        if self.dtype is not None:
            cfg = cfg.replace(param_dtype=self.dtype)
        hf = config_to_hf(cfg)  # "dtype": the parameters' (what transformers loads them in)
        recipe = {k: v for k, v in (quant or {}).items() if k not in RUN_ONLY_KEYS}
        hf["arhq_jax"] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "param_dtype": jax.numpy.dtype(cfg.param_dtype).name,
            "dtype": jax.numpy.dtype(cfg.dtype).name,
            "recipe": recipe,
            "source": source or {},
            "modules": self.modules,
        }
        qc = quantization_config(self.modules)
        if qc is not None:
            hf["quantization_config"] = qc
        if qc is not None and qc["quant_method"] == OWN_QUANT_METHOD:
            hf["arhq_jax"]["model_type"] = hf["model_type"]
            hf["model_type"] = OWN_LAYOUT_MODEL_TYPE
        (self.tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=1, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        if card is not None and card.out is None:
            card = dataclasses.replace(card, out=str(getattr(self, "out", self.tmp.name)))
        layout = "compressed-tensors" if qc and qc["quant_method"] != OWN_QUANT_METHOD else "own"
        model_card.write_files(
            self.tmp, cfg, hf, quant=quant, source=source, card=card, nbytes=nbytes,
            lora_dir=LORA_DIR, layout=layout if qc else "float",
        )  # fmt: skip
        self.finished = True
        return nbytes

    def abort(self) -> None:
        for w in self.shards:
            w.abort()
        if self._adapter is not None:
            self._adapter.abort()


def layer_records(i: int, layer: Layer):
    """``(name, array, None, None)`` per norm then ``(None, None, prefix, Encoded)`` per
    projection of decoder layer ``i``, in checkpoint order."""
    for n in ("input_norm", "post_norm", "q_norm", "k_norm"):
        if getattr(layer, n, None) is not None:
            yield norm_key(i, n), to_numpy(getattr(layer, n)), None, None
    for p in PROJECTIONS:
        yield None, None, linear_key(i, p), encode_linear(linear_key(i, p), getattr(layer, p))


def _close_shards(tmp: Path, shards) -> int:
    """Name the shards as transformers does and write the index (several shards only)."""
    n = len(shards)
    if n == 1:
        shards[0].path = tmp / WEIGHTS_FILE
        shards[0].close({"format": "pt"})
        return 1
    weight_map, total = {}, 0
    for i, w in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        w.path = tmp / name
        total += w.nbytes
        weight_map.update(dict.fromkeys(w.entries, name))
        w.close({"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return n


def quantization_config(modules: dict) -> dict | None:
    """config.json's ``quantization_config`` for these module entries: None when no linear is
    quantized, compressed-tensors' block when every quantized linear is ``ct-nvfp4`` with one
    activation setting, else our own (``OWN_QUANT_METHOD``). The loader recomputes it from the
    entries it decodes and refuses a config.json that says otherwise."""
    quantized = {k: e for k, e in modules.items() if e["kind"] != "dense"}
    if not quantized:
        return None
    if quantized and all(e["kind"] == "ct-nvfp4" for e in quantized.values()):
        w4a4 = {e["w4a4"] for e in quantized.values()}
        if len(w4a4) == 1:
            ignore = [k for k, e in modules.items() if e["kind"] == "dense"]
            if "lm_head" not in modules:  # tied: transformers still has an lm_head Linear
                ignore.append("lm_head")
            return ct_nvfp4.quantization_config(ignore=ignore, w4a4=w4a4.pop())
    return {
        "quant_method": OWN_QUANT_METHOD,
        "note": "arhq-jax's own layout (see config.json 'arhq_jax'); only arhq-jax reads it",
    }
