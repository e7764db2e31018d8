"""Lazy model sources: a model's tensors read when asked for, for quantizing disk to disk.

``open_source(source)`` → ``LazySource``. From a HF directory the tensors are read straight out of
the safetensors files: whole tensors and row blocks with plain file reads, row gathers (the
calibration ids' embedding rows) and strided samples (the fingerprint) through a memory map that
is dropped after each read, so that nothing stays resident but what the caller holds. From a GGUF
(``converters.gguf.GGUFTensors``) only the blocks asked for are dequantized from the reader's
memory map: a layer's tensors whole, the embedding's gathered rows and row blocks, the rows a
fingerprint sample touches. An orbax directory is restored whole (orbax reads the tree at
once) and served from memory.

Every tensor goes through the same checks and cast as ``load_model`` (``params.tensor_loader``:
shape, float dtype, finite, ``cfg.param_dtype``), so a layer read here equals the same layer of
``load_model(...).params`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from arhq_jax.linears.base import Dense
from arhq_jax.models import config_from_hf
from arhq_jax.models.config import PROJECTIONS, Layer, ModelConfig, Params
from arhq_jax.models.params import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    NO_LM_HEAD,
    TIED_DIFFERS,
    expected_tensors,
    layer_from_tensors,
    linear_key,
    norm_key,
    params_from_tensors,
    params_to_tensors,
    tensor_loader,
)
from converters.gguf import gguf_has_tokenizer, gguf_tensors, load_gguf_tokenizer
from converters.hf import (
    WEIGHTS_FILE,
    check_config_values,
    check_index_matches,
    read_hf_config,
    reject_unused,
    weight_files,
)
from converters.orbax_io import load_orbax
from converters.registry import _hf_tokenizer, check_tokenizer, source_kind
from converters.safetensors_io import SafetensorsReader

ROW_BYTES = 64 * 2**20  # row blocks of the big dense tensors (embedding, lm_head) at most this big
_NORMS = ("input_norm", "post_norm", "q_norm", "k_norm")


class _SafetensorsStore:
    """Tensors of safetensors files, in their stored dtype, nothing kept mapped."""

    def __init__(self, files):
        self.reader = SafetensorsReader(files)

    def names(self) -> list[str]:
        return self.reader.names()

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.reader.info(name)
        return None if info is None else tuple(info.shape)

    def read(self, name: str) -> np.ndarray | None:
        return None if self.reader.info(name) is None else self.reader.read_rows(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.reader.read_rows(name, start, stop)

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self.reader.gather_rows(name, ids)

    def strided(self, name: str, step: int) -> np.ndarray:
        return self.reader.strided(name, step)

    def close(self) -> None:
        self.reader.close()


class _GetterStore:
    """Tensors from a ``get(name)`` callback (a restored orbax tree): each read
    whole; the last one is cached so that its row blocks do not read it again."""

    def __init__(self, get, names):
        self._get, self._names, self._last = get, list(names), (None, None)

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> np.ndarray | None:
        if self._last[0] != name:
            self._last = (None, None)  # drop the previous one before reading the next
            self._last = (name, self._get(name))
        return self._last[1]

    def shape(self, name: str):
        x = self.read(name)
        return None if x is None else tuple(np.shape(x))

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.read(name))[start:stop]

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.read(name))[np.asarray(ids)]

    def strided(self, name: str, step: int) -> np.ndarray:
        return np.asarray(self.read(name)).reshape(-1)[::step]

    def close(self) -> None:
        self._last = (None, None)


class LazySource:
    """A float model whose tensors are read on demand (see the module docstring).

    Attributes:
      cfg: the model config (``param_dtype`` float32 unless asked otherwise).
      tokenizer: a transformers tokenizer or None.
      source: what the user named (for messages and provenance).
    """

    def __init__(self, cfg: ModelConfig, store, tokenizer, source: str, where):
        self.cfg, self.store, self.tokenizer = cfg, store, tokenizer
        self.source, self.where = source, where
        self._fetch = tensor_loader(cfg, self._read)
        self._check_names()

    # -- reading

    def _read(self, name: str):
        try:
            return self.store.read(name)
        except ValueError as e:
            raise ValueError(f"{self.where}: {e}") from None

    def _checked(self, fn, *args):
        try:
            return fn(*args)
        except ValueError as e:
            raise ValueError(f"{self.where}: {e}") from None

    def layer(self, i: int) -> Layer:
        """Decoder layer ``i`` in ``cfg.param_dtype`` (one tensor read at a time)."""
        return self._checked(layer_from_tensors, self.cfg, i, self._fetch)

    def final_norm(self):
        """``[H]`` final norm weight in ``cfg.param_dtype``."""
        return self._checked(self._fetch, FINAL_NORM)

    def embed_rows(self, ids) -> np.ndarray:
        """``embed[ids]`` (``ids`` int ``[...]``) → ``[..., H]`` in ``cfg.param_dtype``: gathered
        from the file, the table itself is never materialized."""
        rows = self.store.gather(EMBED, np.asarray(ids))
        return rows.astype(jnp.dtype(self.cfg.param_dtype), copy=False)

    def row_blocks(self, name: str) -> Iterator[np.ndarray]:
        """Consecutive row blocks of a ``[V, H]`` tensor in ``cfg.param_dtype`` (each at most
        ``ROW_BYTES`` in the parameter dtype)."""
        v, h = expected_tensors(self.cfg)[name]
        pdt = jnp.dtype(self.cfg.param_dtype)
        step = max(1, ROW_BYTES // (h * max(pdt.itemsize, 4)))
        for a in range(0, v, step):
            yield self.store.rows(name, a, min(v, a + step)).astype(pdt, copy=False)

    def head_params(self) -> Params:
        """Embedding, final norm and lm_head in memory, no layers (for a method's ``finish``)."""
        fetch = self._fetch
        head = None if self.cfg.tie_word_embeddings else Dense(w=fetch(LM_HEAD))
        return Params(embed=fetch(EMBED), layers=(), final_norm=self.final_norm(), lm_head=head)

    def load_params(self) -> Params:
        """The whole model in memory, as ``load_model`` gives it (whole-model methods)."""
        return self._checked(params_from_tensors, self.cfg, self._read)

    def nbytes(self) -> int:
        """Bytes of the float model in ``cfg.param_dtype``."""
        item = jnp.dtype(self.cfg.param_dtype).itemsize
        return int(sum(np.prod(s) * item for s in expected_tensors(self.cfg).values()))

    # -- one pass of checks before any work

    def fingerprint_samples(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """``(name, size, f32 sample)`` of every float tensor in ``checkpoint.fingerprint``'s
        order and sampling (the stride of at most 4,096 values, after the parameter-dtype cast).

        Also the up-front check of the embedding and lm_head (shape, finite, a tied head equal to
        the embedding), read in row blocks: they are only copied at the very end."""
        pdt = jnp.dtype(self.cfg.param_dtype)
        shapes = expected_tensors(self.cfg)
        # A tied head stored anyway is compared with the embedding in the same pass over it.
        tied_copy = self.cfg.tie_word_embeddings and LM_HEAD in self.store.names()
        self._check_dense(EMBED, tied_copy=tied_copy)
        if not self.cfg.tie_word_embeddings:
            self._check_dense(LM_HEAD)
        names = [EMBED]
        for i in range(self.cfg.num_layers):
            names += [norm_key(i, n) for n in _NORMS if norm_key(i, n) in shapes]
            names += [linear_key(i, p) + ".weight" for p in PROJECTIONS]
        names.append(FINAL_NORM)
        if not self.cfg.tie_word_embeddings:
            names.append(LM_HEAD)
        for name in names:
            shape = self.store.shape(name)
            if shape is None:
                raise ValueError(f"{self.where}: missing tensor {name!r}")
            if tuple(shape) != tuple(shapes[name]):
                raise ValueError(
                    f"{self.where}: tensor {name!r}: expected shape {shapes[name]}, got {shape}"
                )
            size = int(np.prod(shape))
            x = self.store.strided(name, max(1, size // 4096))
            yield name, size, x.astype(pdt).astype(np.float32)

    def _check_dense(self, name: str, tied_copy: bool = False) -> None:
        """Shape, float dtype and finite values of a dense ``[V, H]`` tensor, read in row blocks;
        ``tied_copy``: also that the stored lm_head equals it (a tied head)."""
        shape = self.store.shape(name)
        want = expected_tensors(self.cfg)[name]
        if shape is None:
            what = NO_LM_HEAD if name == LM_HEAD else f"missing tensor {name!r}"
            raise ValueError(f"{self.where}: {what}")
        if tuple(shape) != tuple(want):
            raise ValueError(f"{self.where}: tensor {name!r}: expected shape {want}, got {shape}")
        dt = np.asarray(self.store.rows(name, 0, 1)).dtype
        if dt.kind != "f" and dt.name != "bfloat16":
            raise ValueError(f"{self.where}: tensor {name!r}: expected a float tensor, got {dt}")
        if tied_copy and self.store.shape(LM_HEAD) != shape:
            raise ValueError(f"{self.where}: {TIED_DIFFERS}")
        pdt, a = jnp.dtype(self.cfg.param_dtype), 0
        for block in self.row_blocks(name):
            if not np.isfinite(block.astype(np.float32)).all():
                raise ValueError(
                    f"{self.where}: tensor {name!r} has non-finite values (NaN or inf)"
                )
            if tied_copy:
                lm = self.store.rows(LM_HEAD, a, a + len(block)).astype(pdt, copy=False)
                if not np.array_equal(lm, block):
                    raise ValueError(f"{self.where}: {TIED_DIFFERS}")
            a += len(block)

    def _check_names(self) -> None:
        want = set(expected_tensors(self.cfg)) | {LM_HEAD}
        reject_unused(self.cfg, self.store.names(), want, self.where)

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_source(
    source: str | Path, *, param_dtype: str = "float32", require_tokenizer: bool = False
) -> LazySource:
    """``load_model``'s sources (``"smollm2"``, HF dir, ``.gguf``, orbax dir), read lazily."""
    kind, path = source_kind(source)
    if require_tokenizer:
        check_tokenizer(kind, path)
    if kind == "hf":
        d = read_hf_config(path)
        try:
            cfg = config_from_hf(d, param_dtype=param_dtype, dtype=param_dtype)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        check_config_values(cfg, path / "config.json")
        files = weight_files(path)  # plain names inside the directory (storage.paths)
        store = _SafetensorsStore(files)
        if len(files) > 1 or files[0].name != WEIGHTS_FILE:
            check_index_matches(path, store.reader)
        tok = _hf_tokenizer(path)
    elif kind == "gguf":
        cfg, store = gguf_tensors(path, param_dtype=param_dtype)
        tok = load_gguf_tokenizer(path) if gguf_has_tokenizer(path) else None
    else:
        cfg, params = load_orbax(path, param_dtype=param_dtype)
        tensors = dict(params_to_tensors(cfg, params))
        store = _GetterStore(tensors.get, list(tensors))
        tok = _hf_tokenizer(path / "tokenizer")
    return LazySource(cfg, store, tok, str(source), path)
