"""Quantize disk to disk: one decoder layer in memory at a time, resumable after a kill.

``quantize_stream`` runs the layer loop of ``arhq_jax.run.quantize`` on a lazy source
(``converters.lazy``): it reads layer l (f32), quantizes it stage by stage with the method, writes
its encoded tensors to a work directory, advances the calibration hidden states and frees the
layer. Once every layer is done it assembles the checkpoint through the same
``checkpoint_writer.CheckpointWriter`` as ``checkpoint.save`` (the embedding and lm_head copied
in row blocks from the source), so the files are the ones ``save(quantize_model(...))``
writes, byte for byte. Layer l+1 is read and layer l written by two background threads while
layer l+1 is quantized. Host memory: three layers (the one read ahead, the one quantized, the one
being written) + the calibration hidden states + a row block; device memory: two layers (the
one quantized, the one being written) + two sets of hidden states (the current ones and those
being written).

The work directory ``.<out>.arhq-resume`` beside ``out``::

    state.json                 marker, run key, writer (pid and its start time), layers done,
                               their records, the sha256 of every file, diagnostics, timings
    layer-NNNNN.safetensors    layer N's tensors, in checkpoint order (norms, encoded projections)
    lora-NNNNN.safetensors     its adapter tensors (when it has low-rank branches)
    hidden-NNNNN.safetensors   the calibration hidden states entering layer N (with a runner)

A layer is committed by rewriting ``state.json`` after its files; a rerun with the same key (the
recipe, the source fingerprint, the calibration ids, the batch layout) continues after the last
committed layer, with the stored hidden states, so it computes what the uninterrupted run would
have. A different key is refused with a one-line error naming the directory: a partial run is
never overwritten by another recipe, and nothing is removed that this module did not write.

Nothing is reused unverified (``ResumeError`` otherwise, naming the file and how to start over):
the directory holds only regular files named as this module names them (no symlink, nothing
foreign); ``state.json`` is validated like a checkpoint's config (types, keys, one record per
finished layer, each projection's entry decoded by the checkpoint decoder against the layer
file's tensors, no tensor missing or extra); each layer, adapter and hidden-state file matches
the sha256 recorded when it was written, checked when the run resumes and again right before the
file is read. A writer that is still running (its pid alive with the recorded start time) is
never resumed under; a pid reused by another process does not block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from arhq_jax import __version__
from arhq_jax.calibration.calibrate import Calibration, LayerwiseRunner, data_mesh
from arhq_jax.checkpoint import out_dir, schema
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.checkpoint import writer as checkpoint_writer
from arhq_jax.models.config import PROJECTIONS, ModelConfig
from arhq_jax.models.params import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    expected_tensors,
    has_bias,
    linear_key,
    norm_key,
)
from arhq_jax.parallel.devices import Spread
from arhq_jax.parallel.layer_sharding import data_size
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.progress import LayerProgress
from arhq_jax.run.quantize import layer_stages, quantize_layer
from arhq_jax.storage.atomic import atomic_write
from converters.lazy import LazySource
from converters.safetensors_io import SafetensorsReader, SafetensorsWriter, write_safetensors

WORK_FORMAT = "arhq-jax-resume"
WORK_VERSION = 2  # 2: files' sha256 and the writer's start time recorded
STATE = "state.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIMINGS = ("calibration_s", "decomposition_s", "packing_s")
# The files this module writes, and the temporaries of their atomic writes (a killed run's).
_OURS = re.compile(
    r"^(?:(state\.json|(layer|lora|hidden)-\d{5}\.safetensors)"
    r"|\.(state\.json|(layer|lora|hidden)-\d{5}\.safetensors)\.\w+\.(tmp|data))$"
)


class ResumeError(ValueError):
    """A resume directory that cannot be trusted: foreign or symlinked files, a malformed state
    record, or a file that differs from the sha256 recorded when it was written."""


@dataclasses.dataclass
class StreamResult:
    """What ``quantize_stream`` did: per-projection diagnostics, the time split (this run and
    the interrupted ones it resumed), calibration tokens, bytes written, the first layer this
    run quantized (0: not resumed)."""

    projections: list[dict]
    timings: dict[str, float]
    calib_tokens: int
    nbytes: int
    resumed_from: int


def work_dir(out) -> Path:
    """The work directory of output ``out``: ``.<name>.arhq-resume`` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.arhq-resume"


def run_key(qcfg: QuantConfig, fingerprint: dict, calib_ids, batch_size: int, ndev: int) -> str:
    """Digest of everything a partial run's layers depend on (resume only with an equal key)."""
    ids = None if calib_ids is None else np.ascontiguousarray(np.asarray(calib_ids, np.int64))
    doc = {
        "recipe": qcfg.to_dict(),
        "fingerprint": fingerprint,
        "calib": None if ids is None else [list(ids.shape), hashlib.sha256(ids).hexdigest()],
        "batch": [batch_size, ndev],
        "arhq_jax": __version__,
        "work_version": WORK_VERSION,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(x):
    return np.asarray(jax.device_get(x)).tolist()


class _Work:
    """The work directory: its state, its files (only ones named as this module names them).

    ``cfg`` (the model's) checks the records of a directory being resumed."""

    def __init__(self, path: Path, key: str, cfg: ModelConfig):
        self.path, self.key, self.cfg = path, key, cfg
        self.state = {"format": WORK_FORMAT, "key": key, "done": 0, "layers": [], "diags": []}
        self.state["timings"] = dict.fromkeys(_TIMINGS, 0.0)
        self.state["files"] = {}
        if path.exists() or path.is_symlink():
            self._open_existing()
        else:
            path.mkdir(parents=True)
        self.state["pid"], self.state["pid_start"] = out_dir.this_process()
        self._commit()

    def _fail(self, what: str) -> ResumeError:
        return ResumeError(
            f"{self.path}: {what}; not resuming from it (remove the directory to start over)"
        )

    def _open_existing(self) -> None:
        f = self.path / STATE
        try:
            st = json.loads(f.read_text()) if not f.is_symlink() else None
            ok = isinstance(st, dict) and st.get("format") == WORK_FORMAT
        except (OSError, ValueError, RecursionError):
            ok = False
        if self.path.is_symlink() or not self.path.is_dir() or not ok:
            raise FileExistsError(
                f"{self.path} exists and is not an arhq-jax resume directory; not touching it "
                "(move it away or choose another --out)"
            )
        pid, pid_start = st.get("pid"), st.get("pid_start")
        if (
            isinstance(pid, int)
            and not isinstance(pid, bool)
            and pid != os.getpid()
            and out_dir.pid_alive(pid, pid_start if isinstance(pid_start, int) else None)
        ):
            raise ValueError(f"{self.path} is in use by a running quantize (pid {pid})")
        self._check_entries()
        if st.get("key") != self.key and st.get("done") == 0:
            return  # nothing finished in it: start over in it (the files are rewritten)
        if st.get("key") != self.key:
            raise ValueError(
                f"{self.path} holds a partial run of another recipe, source or calibration set; "
                "rerun that command to finish it, or remove the directory to start over"
            )
        self._check_state(st)
        self.state = st
        for i in range(st["done"]):
            self.check_layer(i)
        if f"hidden-{st['done']:05d}.safetensors" in st["files"]:
            self.verify(self.file("hidden", st["done"]))

    def _check_entries(self) -> None:
        """Only regular files named as this module names them (no symlink, no directory)."""
        for p in sorted(self.path.iterdir()):
            if p.is_symlink():
                raise self._fail(f"{p.name} is a symbolic link")
            if not _OURS.match(p.name) or not p.is_file():
                raise self._fail(f"it holds {p.name!r}, which arhq-jax did not write")

    def _check_state(self, st: dict) -> None:
        """``state.json``'s types and keys, one record per finished layer, a sha256 per file."""
        where = f"{STATE}"
        keys = {"format", "key", "done", "layers", "diags", "timings", "files", "pid", "pid_start"}
        if set(st) != keys:
            extra, missing = sorted(set(st) - keys), sorted(keys - set(st))
            raise self._fail(f"{where}: unexpected keys {extra}, missing keys {missing}")
        done = st["done"]
        if not isinstance(done, int) or isinstance(done, bool):
            raise self._fail(f"{where}: 'done' must be an integer, got {done!r}")
        if not 0 <= done <= self.cfg.num_layers:
            raise self._fail(f"{where}: 'done' {done} is not in [0, {self.cfg.num_layers}]")
        if not isinstance(st["layers"], list) or len(st["layers"]) != done:
            raise self._fail(f"{where}: 'layers' must be a list of {done} records")
        if not isinstance(st["diags"], list):
            raise self._fail(f"{where}: 'diags' must be a list")
        t = st["timings"]
        ok = (
            isinstance(t, dict)
            and set(t) == set(_TIMINGS)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t.values())
        )
        if not ok:
            raise self._fail(f"{where}: 'timings' must map {', '.join(_TIMINGS)} to numbers")
        files = st["files"]
        if not isinstance(files, dict):
            raise self._fail(f"{where}: 'files' must be a JSON object")
        for name, h in files.items():
            if not _OURS.match(name) or name == STATE or not isinstance(h, str):
                raise self._fail(f"{where}: bad 'files' entry {name!r}")
            if not _SHA256.fullmatch(h):
                raise self._fail(f"{where}: bad sha256 for {name!r}")
        for i in range(done):
            if f"layer-{i:05d}.safetensors" not in files:
                raise self._fail(f"{where}: no sha256 recorded for layer {i}")

    def verify(self, p: Path) -> None:
        """``p`` is a regular file whose sha256 is the one recorded when it was written."""
        want = self.state["files"].get(p.name)
        if want is None:
            raise self._fail(f"no sha256 recorded for {p.name}")
        if p.is_symlink() or not p.is_file():
            raise self._fail(f"{p.name} is missing or not a regular file")
        if out_dir.sha256_file(p) != want:
            kind, n = p.name.split(".")[0].split("-")
            what = {"layer": "layer {}", "lora": "layer {}'s adapter", "hidden": "the hidden "
                    "states entering layer {}"}[kind].format(int(n))  # fmt: skip
            raise self._fail(
                f"{p.name} ({what}) differs from the file the run wrote (sha256 mismatch: "
                "changed since)"
            )

    def check_layer(self, i: int) -> None:
        """Layer ``i``'s files match their sha256 and its record decodes against them exactly
        (the checkpoint's own decoder: entry keys and types, tensor names, dtypes, shapes)."""
        rec, layer_f, lora_f = self.state["layers"][i], self.file("layer", i), self.file("lora", i)
        self.verify(layer_f)
        has_lora = lora_f.name in self.state["files"]
        if has_lora:
            self.verify(lora_f)
        try:
            with SafetensorsReader([layer_f]) as r:
                lr = SafetensorsReader([lora_f]) if has_lora else None
                try:
                    _check_record(self.cfg, i, rec, r, lr)
                finally:
                    if lr is not None:
                        lr.close()
        except schema.CheckpointError as e:
            raise self._fail(f"{STATE}: layer {i}'s record: {e}") from None

    def layer_files(self, done: int) -> list[str]:
        return [f"layer-{i:05d}.safetensors" for i in range(done)]

    def file(self, kind: str, i: int) -> Path:
        return self.path / f"{kind}-{i:05d}.safetensors"

    def record_file(self, p: Path) -> None:
        """Note ``p``'s sha256 (just written) in the state (committed with the next layer)."""
        self.state["files"][p.name] = out_dir.sha256_file(p)

    def _commit(self) -> None:
        atomic_write(self.path / STATE, json.dumps(self.state, default=_jsonable) + "\n")

    def commit_layer(self, record: list, diags: list, timings: dict) -> None:
        done = self.state["done"]
        self.state["files"].pop(f"hidden-{done:05d}.safetensors", None)  # used: removed next
        self.state["layers"].append(record)
        self.state["diags"] += diags
        self.state["timings"] = dict(timings)
        self.state["done"] += 1
        self._commit()

    def remove(self) -> None:
        """Delete the directory if it holds only what this module writes (else leave it)."""
        for p in self.path.iterdir():
            if (p.is_file() or p.is_symlink()) and _OURS.match(p.name):
                p.unlink()
        try:
            self.path.rmdir()
        except OSError:
            pass  # something else is in there: not ours to delete


def _getter(reader, allowed: list[str], where: str):
    """``get(name)`` for the decoder: only the names ``allowed`` (a record's), from ``reader``;
    the set of names it gave out."""
    got: set[str] = set()

    def get(n: str) -> np.ndarray:
        x = None if reader is None or n not in allowed else reader.get(n)
        if x is None:
            raise schema.CheckpointError(f"{where}: tensor {n!r} is missing")
        got.add(n)
        return np.asarray(x)

    return get, got


def _check_record(cfg: ModelConfig, i: int, rec, r, lr) -> None:
    """Raise ``CheckpointError`` unless ``rec`` is layer ``i``'s record as ``_write_layer``
    makes it, every entry decodes against the tensors of reader ``r`` (``lr``: the adapter's)
    and the records name exactly the tensors the files hold."""
    err = schema.CheckpointError
    norms = ["input_norm", "post_norm"] + (["q_norm", "k_norm"] if cfg.qk_norm else [])
    want = [("tensor", norm_key(i, n)) for n in norms]
    want += [("linear", linear_key(i, p)) for p in PROJECTIONS]
    if not isinstance(rec, list) or len(rec) != len(want):
        raise err(f"expected a list of {len(want)} entries")
    shapes, hf_shapes = cfg.linear_shapes(), expected_tensors(cfg)
    pdt = jnp.dtype(cfg.param_dtype).name
    used, lused = [], []
    for e, (kind, name) in zip(rec, want, strict=True):
        if not isinstance(e, list) or not e or e[0] != kind:
            raise err(f"expected a {kind!r} entry for {name}, got {str(e)[:80]}")
        if kind == "tensor":
            if e != ["tensor", name]:
                raise err(f"expected ['tensor', {name!r}], got {str(e)[:80]}")
            x = r.get(name)
            if x is None:
                raise err(f"tensor {name!r} is missing from its layer file")
            if x.dtype.name != pdt or tuple(x.shape) != tuple(hf_shapes[name]):
                raise err(f"tensor {name!r}: {x.dtype.name}{list(x.shape)}, expected {pdt}")
            used.append(name)
            continue
        ok = (
            len(e) == 5
            and e[1] == name
            and isinstance(e[2], dict)
            and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in e[3:])
        )
        if not ok:
            raise err(f"expected ['linear', {name!r}, entry, names, adapter names] for {name}")
        _, prefix, entry, names, lnames = e
        get, got = _getter(r, names, prefix)
        get_lora, lgot = _getter(lr, lnames, f"{prefix} (adapter)")
        proj = prefix.rsplit(".", 1)[1]
        bias = pdt if has_bias(cfg, proj) else None
        schema.decode_linear(prefix, entry, get, get_lora, shapes[proj], bias)
        if got != set(names) or lgot != set(lnames):
            extra = sorted((set(names) - got) | (set(lnames) - lgot))
            raise err(f"{prefix}: unexpected tensors {extra[:3]}")
        used += names
        lused += lnames
    for reader, names, what in ((r, used, "layer"), (lr, lused, "adapter")):
        have = [] if reader is None else reader.names()
        if sorted(have) != sorted(names) or len(set(names)) != len(names):
            extra = sorted(set(have) ^ set(names)) or sorted(names)
            raise err(
                f"its {what} file holds {len(have)} tensors, the record names "
                f"{len(names)} ({', '.join(extra[:3])})"
            )


def _write_layer(work: _Work, i: int, layer) -> list:
    """Layer ``i``'s encoded tensors → ``layer-i`` / ``lora-i`` files; its record for state."""
    record, lora_w, w = [], None, SafetensorsWriter(work.file("layer", i))
    try:
        for name, arr, prefix, enc in checkpoint_writer.layer_records(i, layer):
            if enc is None:
                w.add(name, arr)
                record.append(["tensor", name])
                continue
            for n, a in enc.tensors:
                w.add(n, a)
            for n, a in enc.lora:
                lora_w = lora_w or SafetensorsWriter(work.file("lora", i))
                lora_w.add(n, a)
            names = [n for n, _ in enc.tensors]
            record.append(["linear", prefix, enc.entry, names, [n for n, _ in enc.lora]])
        w.close()
        work.record_file(work.file("layer", i))
        if lora_w is not None:
            lora_w.close()
            work.record_file(work.file("lora", i))
    except BaseException:
        w.abort()
        if lora_w is not None:
            lora_w.abort()
        raise
    return record


def _save_hidden(work: _Work, i: int, runner: LayerwiseRunner) -> None:
    write_safetensors(
        work.file("hidden", i), ((f"h.{k}", h) for k, h in enumerate(runner.hidden_states()))
    )
    work.record_file(work.file("hidden", i))


def _load_hidden(work: _Work, i: int) -> list[np.ndarray]:
    work.verify(work.file("hidden", i))
    with SafetensorsReader([work.file("hidden", i)]) as r:
        names = r.names()
        if sorted(names) != sorted(f"h.{k}" for k in range(len(names))):
            raise work._fail(f"hidden-{i:05d}.safetensors: unexpected tensors {names[:3]}")
        return [r.read_rows(f"h.{k}") for k in range(len(names))]


class _Held:
    """A runner's hidden states at one moment (its immutable batches), for ``_save_hidden`` in
    the writer thread while the runner moves on (device memory: one more set of hidden states)."""

    def __init__(self, runner: LayerwiseRunner):
        self._hs = [h for h, _ in runner.batches()]

    def hidden_states(self) -> list[np.ndarray]:
        return [np.asarray(jax.device_get(h)) for h in self._hs]


def _write_and_commit(work: _Work, li: int, layer, held, diags, timings) -> None:
    """The writer thread's step: layer ``li``'s files, the hidden states after it, the commit."""
    record = _write_layer(work, li, layer)
    if held is not None:
        _save_hidden(work, li + 1, held)
    diags = json.loads(json.dumps(diags, default=_jsonable))
    work.commit_layer(record, diags, timings)
    if work.file("hidden", li).is_file():
        work.file("hidden", li).unlink()  # the one entering this layer: no longer needed


def _join(pending, on_layer) -> None:
    """Wait for the pending write and commit (re-raising its error), then ``on_layer``."""
    if pending is None:
        return
    li, future = pending
    future.result()
    if on_layer is not None:
        on_layer(li)


def quantize_stream(
    src: LazySource,
    calib_ids,
    qcfg: QuantConfig,
    out,
    *,
    quant: dict | None = None,
    source: dict | None = None,
    batch_size: int = 8,
    mesh=None,
    devices=None,
    hidden_on_host: bool = False,
    progress: bool = True,
    on_layer=None,
    max_shard_bytes: int = checkpoint_writer.DEFAULT_SHARD_BYTES,
    card=None,
    dtype: str | None = None,
) -> StreamResult:
    """Quantize ``src`` layer by layer into the checkpoint directory ``out``.

    Args:
      src: the float model (``converters.lazy.open_source``).
      calib_ids: ``[S, L]`` int calibration ids, or None for a data-free recipe.
      qcfg: the recipe; its method must stream (``Method.streams``).
      quant: recorded as the checkpoint's recipe; ``calib_tokens`` and ``timings`` are added.
      source: ``{"model": ...}`` provenance; the fingerprint is added (computed here).
      batch_size, mesh, devices, hidden_on_host: as ``quantize_model`` (the batch layout is part
        of the run key).
      on_layer: called with the layer index after each layer is committed (tests kill a run
        there).
      card: a ``model_card.Card`` for the model card and provenance (its diagnostics are the
        run's, filled in here).
      dtype: the checkpoint's storage dtype of the float parameters (``CheckpointWriter``);
        None keeps ``src.cfg.param_dtype``. The layers are quantized and kept in the work
        directory in the source's f32 whatever it is.

    Returns:
      A ``StreamResult``. The work directory is removed once the checkpoint is in place.
    """
    cfg = src.cfg
    qcfg.check_model(cfg)
    method = qcfg.method_impl
    if not method.streams(qcfg):
        raise ValueError(f"{qcfg.label()} reads the whole model before its layers; not streamable")
    checkpoint.check_out(out)
    need_runner = qcfg.sequential or method.needs_calibration(qcfg)
    if need_runner and calib_ids is None:
        raise ValueError(f"{qcfg.label()} needs calibration tokens; calib_ids is None")
    fp = checkpoint.fingerprint_of(cfg, src.fingerprint_samples())  # also checks embed/lm_head
    mesh = data_mesh() if mesh is None else mesh
    ndev = data_size(mesh)
    key = run_key(qcfg, fp, calib_ids if need_runner else None, batch_size, ndev)
    work = _Work(work_dir(out), key, cfg)
    start = work.state["done"]
    timings = dict(work.state["timings"])
    runner = None
    if need_runner:
        t0 = time.perf_counter()
        hidden = _load_hidden(work, start) if start else None
        runner = LayerwiseRunner(
            None,
            cfg,
            calib_ids,
            batch_size,
            mesh,
            embed_rows=src.embed_rows,
            hidden=hidden,
            hidden_on_host=hidden_on_host,
        )
        timings["calibration_s"] += time.perf_counter() - t0
    calib = Calibration(runner, cfg, None, Spread.for_mesh(mesh, devices))
    stages = layer_stages(qcfg)
    bar = LayerProgress(
        cfg.num_layers, len(stages), initial=start, desc=qcfg.label(), disable=not progress
    )
    # Overlap: a reader thread decodes layer li+1 from the source and a writer thread writes and
    # commits layer li (and the hidden states after it) while layer li+1 is quantized. A layer is
    # committed only after its files, in order; ``on_layer(li)`` runs once layer li's commit is
    # done, and every started write is finished (or failed) before this function returns.
    reader = ThreadPoolExecutor(1, thread_name_prefix="arhq-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="arhq-write")
    pending = None  # (li, future) of the last submitted write and commit
    nxt = reader.submit(src.layer, start) if start < cfg.num_layers else None
    try:
        for li in range(start, cfg.num_layers):
            fp_layer = nxt.result()
            nxt = reader.submit(src.layer, li + 1) if li + 1 < cfg.num_layers else None
            layer, layer_diags = quantize_layer(fp_layer, li, stages, calib, qcfg, timings, bar)
            held = None
            if runner is not None:
                t0 = time.perf_counter()
                runner.advance(layer if qcfg.sequential else fp_layer)
                held = _Held(runner)
                timings["calibration_s"] += time.perf_counter() - t0
            _join(pending, on_layer)
            job = (work, li, layer, held, layer_diags, dict(timings))
            pending = (li, writer.submit(_write_and_commit, *job))
            del fp_layer, layer, job
        _join(pending, on_layer)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a started write completes: nothing is left half-written
    bar.close()
    head = None
    if method.finishes(qcfg):  # e.g. AWQ's quantized lm_head: needs the head in memory
        head = method.finish(src.head_params(), cfg, calib, qcfg)
    quant = {**(quant or {}), "calib_tokens": 0 if runner is None else runner.num_tokens}
    quant["timings"] = timings
    source = {**(source or {}), "fingerprint": fp}
    if card is not None:
        card = dataclasses.replace(card, diagnostics=work.state["diags"])
    nbytes = _assemble(src, work, head, out, quant, source, max_shard_bytes, card, dtype)
    work.remove()
    return StreamResult(work.state["diags"], timings, quant["calib_tokens"], nbytes, start)


def _assemble(
    src, work: _Work, head, out, quant, source, max_shard_bytes, card=None, dtype=None
) -> int:
    """The checkpoint from the source's dense tensors and the work directory's layers."""
    cfg = src.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    shape = (cfg.vocab_size, cfg.hidden_size)
    with checkpoint_writer.writing(out, max_shard_bytes, dtype) as w:
        w.add_blocks(EMBED, pdt, shape, src.row_blocks(EMBED))
        for i, record in enumerate(work.state["layers"]):
            lora_file = work.file("lora", i)
            has_lora = lora_file.name in work.state["files"]
            work.verify(work.file("layer", i))  # again: the file may have changed meanwhile
            if has_lora:
                work.verify(lora_file)
            with SafetensorsReader([work.file("layer", i)]) as r:
                lr = SafetensorsReader([lora_file]) if has_lora else None
                for rec in record:
                    if rec[0] == "tensor":
                        w.add(rec[1], r.read_rows(rec[1]))
                        continue
                    _, prefix, entry, names, lnames = rec
                    tensors = [(n, r.read_rows(n)) for n in names]
                    w.add_encoded(prefix, entry, tensors, [(n, lr.read_rows(n)) for n in lnames])
        w.add(FINAL_NORM, np.asarray(src.final_norm()))
        if head is not None and head.lm_head is not None:
            w.add_linear("lm_head", head.lm_head)
        elif not cfg.tie_word_embeddings:
            w.add_blocks(LM_HEAD, pdt, shape, src.row_blocks(LM_HEAD))
            w.add_encoded("lm_head", {"kind": "dense", "dtype": pdt.name}, [], [])
        return w.finish(cfg, quant=quant, tokenizer=src.tokenizer, source=source, card=card)
