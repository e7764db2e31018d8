"""The safetensors container: a validating header parser, a streaming reader, a streaming writer.

Layout (docs/spec/models.md §3): an 8-byte little-endian header length n, n bytes of JSON mapping
each name
to ``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data start) plus an
optional ``__metadata__`` (str → str), then the raw little-endian C-order data.

safetensors 0.8 + numpy 2.4 cannot read F8 tensors (``np.float8_e4m3fn`` does not exist), so F8
tensors are read from our own header through a memmap and viewed as the ``ml_dtypes`` type; the
other dtypes go through ``safe_open(framework="numpy")``. Every file's header is validated first,
so a truncated file is a ``ValueError`` naming the file rather than a Rust panic message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from arhq_jax.storage.atomic import atomic_file
from arhq_jax.storage.jsonio import JSONFileError, loads_json

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
# Read through safe_open; the rest (F8) through our memmap.
_SAFE_OPEN_DTYPES = frozenset(k for k in DTYPES if not k.startswith("F8_"))
_MAX_HEADER = 100 * 2**20  # the Rust library's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header (sizes, dtypes, offsets against the file size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        if 8 + n > size:
            raise ValueError(
                f"{path}: truncated safetensors file (header needs {8 + n} bytes, file has {size})"
            )
        try:
            doc = loads_json(f.read(n), f"{path}: safetensors header", max_depth=4)
        except JSONFileError as e:
            raise ValueError(f"corrupt safetensors header: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ must map str to str)")
    start = 8 + n
    tensors = {}
    data_end = 0
    for name, d in doc.items():
        ok = (
            isinstance(d, dict)
            and set(d) == {"dtype", "shape", "data_offsets"}
            and isinstance(d["dtype"], str)
            and isinstance(d["shape"], list)
            and all(_is_uint(s) for s in d["shape"])
            and isinstance(d["data_offsets"], list)
            and len(d["data_offsets"]) == 2
            and all(_is_uint(x) for x in d["data_offsets"])
        )
        if not ok:
            raise ValueError(f"{path}: corrupt safetensors entry for {name!r}: {str(d)[:200]}")
        dtype, shape, (b, e) = d["dtype"], tuple(d["shape"]), d["data_offsets"]
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if e - b != nbytes or b < 0:
            raise ValueError(
                f"{path}: tensor {name!r} {dtype}{list(shape)} has {e - b} bytes, expected {nbytes}"
            )
        tensors[name] = TensorInfo(name, dtype, shape, start + b, start + e)
        data_end = max(data_end, e)
    # As the Rust reader requires: the tensors tile the data, without gaps or overlaps (a
    # corrupted name can make two entries one, leaving a hole).
    pos = start
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            raise ValueError(
                f"{path}: corrupt safetensors header (tensor {t.name!r} starts at byte {t.begin}, "
                f"expected {pos}: overlapping or missing entries)"
            )
        pos = t.end
    if start + data_end > size:
        raise ValueError(
            f"{path}: truncated safetensors file ({size} bytes, the header needs "
            f"{start + data_end})"
        )
    if start + data_end < size:
        raise ValueError(
            f"{path}: corrupt safetensors file ({size - start - data_end} bytes after the data)"
        )
    return Header(path, tensors, metadata)


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def _mapped(path: Path, t: TensorInfo) -> np.memmap:
    """A read-only uint8 memory map of tensor ``t``'s bytes in ``path``."""
    return np.memmap(path, dtype=np.uint8, mode="r", offset=t.begin, shape=(t.end - t.begin,))


class SafetensorsReader:
    """Streams tensors out of one or more safetensors files, one at a time.

    ``get(name)`` returns a numpy array in the stored dtype (``ml_dtypes`` for BF16/F8), or None
    when no file holds ``name``. Use as a context manager (or call ``close``).
    """

    def __init__(self, files: Iterable[str | Path]):
        self._headers = [read_header(p) for p in files]
        self._where: dict[str, Header] = {}
        for h in self._headers:
            for name in h.tensors:
                if name in self._where:
                    raise ValueError(
                        f"tensor {name!r} is in both {self._where[name].path} and {h.path}"
                    )
                self._where[name] = h
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo | None:
        h = self._where.get(name)
        return None if h is None else h.tensors[name]

    def info_path(self, name: str) -> Path | None:
        """The file that holds tensor ``name``, or None."""
        h = self._where.get(name)
        return None if h is None else h.path

    def get(self, name: str) -> np.ndarray | None:
        h = self._where.get(name)
        if h is None:
            return None
        t = h.tensors[name]
        if t.dtype in _SAFE_OPEN_DTYPES:
            try:
                if h.path not in self._handles:
                    self._handles[h.path] = safe_open(str(h.path), framework="numpy")
                return self._handles[h.path].get_tensor(name)
            except SafetensorError as e:  # what our header check does not catch
                raise ValueError(f"{h.path}: corrupt safetensors file: {e}") from None
        return np.array(self._typed_map(name))

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of tensor ``name`` (leading axis; the whole tensor by default)
        in the stored dtype, read with plain file reads: nothing stays mapped, so the memory held
        is the returned copy only (``get`` goes through safe_open, whose mapping of the whole
        file keeps every page it touched resident)."""
        t = self._info(name)
        rows = t.shape[0] if t.shape else 1
        stop = rows if stop is None else min(stop, rows)
        if not 0 <= start <= stop:
            raise ValueError(f"tensor {name!r}: bad row range [{start}, {stop})")
        dtype = DTYPES[t.dtype]
        row = math.prod(t.shape[1:]) * dtype.itemsize
        out = np.empty((stop - start) * row, np.uint8)
        with open(self._where[name].path, "rb") as f:
            f.seek(t.begin + start * row)
            if f.readinto(memoryview(out)) != out.size:
                raise ValueError(f"{self._where[name].path}: truncated while reading {name!r}")
        shape = (stop - start, *t.shape[1:]) if t.shape else ()
        return out.view(dtype).reshape(shape)

    def gather_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``tensor[rows]`` (``rows`` int, any shape) in the stored dtype, gathered from a
        read-only memory map that is dropped on return (only the touched pages are read)."""
        return np.array(self._typed_map(name)[np.asarray(rows)])

    def strided(self, name: str, step: int) -> np.ndarray:
        """``tensor.reshape(-1)[::step]`` in the stored dtype (a memory map dropped on return)."""
        return np.array(self._typed_map(name).reshape(-1)[::step])

    def _info(self, name: str) -> TensorInfo:
        t = self.info(name)
        if t is None:
            raise KeyError(name)
        return t

    def _typed_map(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only memory map in its dtype and shape (zeros when it is
        empty); the caller copies what it indexes, and the map is dropped with the view."""
        t = self._info(name)
        dtype = DTYPES[t.dtype]
        if t.end == t.begin:
            return np.zeros(t.shape, dtype)
        return _mapped(self._where[name].path, t).view(dtype).reshape(t.shape)

    def close(self):
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: one tensor in memory at a time.

    The data go to a temporary file first (the header, which precedes them, is only known at the
    end); ``close`` assembles the final file beside ``path`` under a temporary name and renames it,
    ``abort`` removes every temporary. ``nbytes`` is the data written so far (for sharding).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.nbytes = 0
        fd, self._data_tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".data"
        )
        self._data = os.fdopen(fd, "wb")

    def add(self, name: str, arr) -> None:
        arr = np.asarray(arr)  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        self.add_chunks(name, arr.dtype, arr.shape, [arr])

    def add_chunks(self, name: str, dtype, shape, chunks: Iterable) -> None:
        """Add tensor ``name`` of ``dtype`` / ``shape`` from consecutive C-order pieces (e.g. row
        blocks of an embedding): one piece in memory at a time; the pieces must cover it."""
        dtype = np.dtype(dtype)
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(
                f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors "
                "(store FP4 as packed U8)"
            )
        if dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r}: big-endian arrays are not supported")
        n = 0
        for c in chunks:
            c = np.asarray(c)
            if c.dtype != dtype:
                raise ValueError(f"tensor {name!r}: a piece of dtype {c.dtype}, expected {dtype}")
            buf = c.tobytes(order="C")
            self._data.write(buf)
            n += len(buf)
        need = math.prod(shape) * dtype.itemsize
        if n != need:
            raise ValueError(f"tensor {name!r}: pieces hold {n} bytes, {list(shape)} needs {need}")
        self.entries[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [self.nbytes, self.nbytes + n],
        }
        self.nbytes += n

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        try:
            self._data.close()
            doc = ({"__metadata__": meta} if meta else {}) | self.entries
            header = json.dumps(doc, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # align the data start to 8 bytes, as safetensors
            with atomic_file(self.path) as tmp, open(tmp, "wb") as out:
                with open(self._data_tmp, "rb") as data:
                    out.write(struct.pack("<Q", len(header)))
                    out.write(header)
                    shutil.copyfileobj(data, out, 16 * 2**20)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Remove the temporary data file (idempotent)."""
        self._data.close()
        if os.path.exists(self._data_tmp):
            os.unlink(self._data_tmp)


def write_safetensors(
    path: str | Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``(name, array)`` pairs to ``path``, streaming (see ``SafetensorsWriter``)."""
    w = SafetensorsWriter(path)
    try:
        for name, arr in tensors:
            w.add(name, arr)
    except BaseException:
        w.abort()
        raise
    return w.close(metadata)
