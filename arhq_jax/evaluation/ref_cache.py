"""A disk cache of the float model's reference for evaluation, so that scoring a checkpoint does
not re-run the float model every time.

One entry per key: the float model's identity (its source fingerprint and dtypes), the exact
evaluation chunks (the sha256 of their token ids: text, tokenizer, seq-len and chunk count), the
batch layout, the JAX backend and versions. An entry is two files in the cache directory:

::

    <key>.json   format, key, the chunk shape, the float model's summed scores (NLL, KL 0,
                 top-1) and predicted tokens, and the logits' shape, dtype and sha256 (or null)
    <key>.npy    the float logits ``[n_chunks, L, V]`` f32, when they fit ``max_bytes``
                 (written batch by batch into a memory map: the host holds one batch)

With the logits the float model is never run again (its KL and top-1 against each checkpoint
come from them); without (too large), a float-only evaluation is answered from the scores and
a checkpoint's evaluation runs the float model again. Both files are written atomically (the
JSON last, naming the logits' sha256). Nothing is trusted unchecked: a JSON that is not an
entry of this key, a logits file of another size, shape, dtype or sha256 is reported in one line
and recomputed (the entry is then rewritten). The cache directory is ``$ARHQ_JAX_CACHE`` or
``~/.cache/arhq-jax``; ``ARHQ_JAX_NO_CACHE=1`` turns it off; ``ARHQ_JAX_CACHE_MAX_BYTES`` caps
the logits of one entry (default 2 GiB: SmolLM2's 16 chunks of 512 are 1.6 GB). Only files
named ``ref-<64 hex>.{json,npy}`` are ever written or replaced there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import jax
import jaxlib
import numpy as np

from arhq_jax import __version__
from arhq_jax.storage.atomic import atomic_file, atomic_write
from arhq_jax.storage.jsonio import read_json

FORMAT = "arhq-jax-eval-reference"
VERSION = 1
ENV_DIR, ENV_OFF, ENV_MAX = "ARHQ_JAX_CACHE", "ARHQ_JAX_NO_CACHE", "ARHQ_JAX_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 * 2**30


def cache_dir() -> Path | None:
    """``$ARHQ_JAX_CACHE`` or ``~/.cache/arhq-jax``; None when ``ARHQ_JAX_NO_CACHE`` is set to
    anything but ``0`` or empty."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    d = os.environ.get(ENV_DIR)
    return Path(d).expanduser() if d else Path("~/.cache/arhq-jax").expanduser()


def max_bytes() -> int:
    v = os.environ.get(ENV_MAX)
    if v is None or v == "":
        return DEFAULT_MAX_BYTES
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{ENV_MAX} must be a byte count, got {v!r}") from None
    if n < 0:
        raise ValueError(f"{ENV_MAX} must be >= 0, got {n}")
    return n


def reference_key(identity: dict, chunks: np.ndarray, batch_size: int, ndev: int) -> str:
    """The entry key: ``identity`` (the float model's fingerprint and dtypes), the chunks' token
    ids, the batch layout, the backend and the versions that compute the logits."""
    ids = np.ascontiguousarray(np.asarray(chunks, np.int32))
    doc = {
        "model": identity,
        "chunks": [list(ids.shape), hashlib.sha256(ids.tobytes()).hexdigest()],
        "batch": [int(batch_size), int(ndev)],
        "backend": jax.default_backend(),
        "versions": [jax.__version__, jaxlib.__version__, __version__, VERSION],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Entry:
    """A verified entry: the float model's summed scores and, when cached, its logits (a
    read-only memory map)."""

    def __init__(self, sums: np.ndarray, n_pred: int, logits: np.ndarray | None):
        self.sums, self.n_pred, self.logits = sums, n_pred, logits


class RefCache:
    """The entry of one key in directory ``root``; ``warn`` receives the one-line reason when an
    entry is refused (corrupted, truncated, another key)."""

    def __init__(self, root: Path, key: str, warn=None):
        self.root, self.key = Path(root), key
        self.warn = warn or (lambda msg: None)
        self.meta_path = self.root / f"ref-{key}.json"
        self.logits_path = self.root / f"ref-{key}.npy"

    def _refuse(self, what: str) -> None:
        self.warn(f"evaluation cache {self.meta_path.name}: {what}; recomputing the float model")

    def load(self, shape: tuple[int, int, int]) -> Entry | None:
        """The entry for chunks giving logits of ``shape`` ``[n, L, V]``, or None (absent or
        refused)."""
        if not self.meta_path.exists():
            return None
        try:
            meta = read_json(self.meta_path)
        except (ValueError, OSError) as e:
            self._refuse(f"unreadable ({str(e)[:80]})")
            return None
        if not _valid_meta(meta, self.key, shape):
            self._refuse("not an entry of this key and shape")
            return None
        sums = np.asarray(meta["sums"], np.float64)
        logits = None
        if meta["logits_sha256"] is not None:
            logits = self._logits(meta, shape)
            if logits is None:
                return None
        return Entry(sums, meta["n_pred"], logits)

    def _logits(self, meta: dict, shape) -> np.ndarray | None:
        p = self.logits_path
        if p.is_symlink() or not p.is_file():
            self._refuse("its logits file is missing")
            return None
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            self._refuse(f"its logits file is unreadable ({str(e)[:80]})")
            return None
        if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shape):
            self._refuse(f"its logits are {arr.dtype}{list(arr.shape)}, expected f32{list(shape)}")
            return None
        if _sha256(p) != meta["logits_sha256"]:
            self._refuse("its logits file's sha256 differs (corrupted or changed)")
            return None
        return arr

    @contextlib.contextmanager
    def logits_writer(self, shape: tuple[int, int, int]):
        """Yield ``put(start, rows)`` that writes f32 logit rows ``[k, L, V]`` at chunk
        ``start`` straight into a temporary ``.npy`` beside the entry (host memory: one batch);
        the file becomes the entry's logits when the block ends without error (``save`` then
        records its sha256), and is removed otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.logits_path) as tmp:
            held = {"arr": np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)}

            def put(start: int, rows) -> None:
                rows = np.asarray(rows, np.float32)[: shape[0] - start]
                held["arr"][start : start + len(rows)] = rows

            yield put
            held.pop("arr").flush()  # (the map closes with its last reference)

    def save(self, sums: np.ndarray, n_pred: int, logits: bool) -> None:
        """Write the entry's JSON: the scores and, when ``logits`` (just written by
        ``logits_writer``), the logits' shape and sha256; else stale logits of this key go."""
        self.root.mkdir(parents=True, exist_ok=True)
        sha = shape = None
        if logits:
            arr = np.load(self.logits_path, mmap_mode="r", allow_pickle=False)
            shape = [int(x) for x in arr.shape]
            del arr
            sha = _sha256(self.logits_path)
        elif self.logits_path.is_file() and not self.logits_path.is_symlink():
            self.logits_path.unlink()  # ours (the name is this key's): stale logits go
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key,
            "sums": [float(x) for x in np.asarray(sums, np.float64)],
            "n_pred": int(n_pred),
            "logits_shape": shape,
            "logits_sha256": sha,
        }
        atomic_write(self.meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _valid_meta(meta, key: str, shape) -> bool:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return False
    if meta.get("version") != VERSION or meta.get("key") != key:
        return False
    sums, n_pred = meta.get("sums"), meta.get("n_pred")
    ok = (
        isinstance(sums, list)
        and len(sums) == 3
        and all(isinstance(x, (int, float)) and math.isfinite(x) for x in sums)
        and isinstance(n_pred, int)
        and n_pred == shape[0] * (shape[1] - 1)
    )
    if not ok:
        return False
    sha = meta.get("logits_sha256")
    if sha is None:
        return True
    return (
        isinstance(sha, str)
        and len(sha) == 64
        and meta.get("logits_shape") == [int(x) for x in shape]
    )


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(16 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()
