"""Perplexity corpora of the GPTQ/AWQ papers: WikiText-2 (raw, test) and C4 (validation).

The token streams mirror GPTQ's ``datautils.py`` (IST-DASLab/gptq), which AWQ and most later
papers reuse, so a perplexity from ``eval.evaluate`` / ``pipeline.evaluate_models`` with
``seq_len=2048`` and no chunk limit is the number those papers report:

* ``wikitext2``: the test split's ``text`` rows joined with ``"\\n\\n"``, tokenized once with the
  tokenizer's defaults; the evaluation cuts ⌊T/2048⌋ chunks and drops the tail.
* ``c4``: the first validation shard (``en/c4-validation.00000-of-00008.json.gz``); with
  ``random.seed(0)``, 256 times: draw documents ``randint(0, n_docs - 1)`` until one tokenizes
  (defaults) to ≥ 2048 tokens, then a window start ``randint(0, n_tokens - 2048 - 1)``; the
  windows are concatenated, so the evaluation's chunks are exactly those windows.
* ``pydoc``: this project's offline default (``eval.pydoc_corpus``, its last 40 %).

The rows come through ``datasets`` when the machine is online, or from a local copy
(``data_file``): a parquet file (the hub's layout, e.g. ``wikitext-2-raw-v1/test-00000-of-00001
.parquet``), JSON lines or a JSON list of objects with a ``text`` field, optionally gzipped (C4's
layout), or a ``.txt`` file — for wikitext2 the already-joined text, for c4 one document per line.
"""

from __future__ import annotations

import gzip
import json
import random
import stat
from pathlib import Path

import numpy as np

import arhq_jax.evaluation.metrics as ev

DATASETS = ("pydoc", "wikitext2", "c4")
PAPER_SEQ_LEN = 2048
C4_SAMPLES = 256
C4_SEED = 0
WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
C4_HUB = ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz")


def check_text_file(path, what: str = "text file") -> Path:
    """``path`` as a Path if it is a regular file (or a link to one); else FileNotFoundError
    (absent), IsADirectoryError, or ValueError for a FIFO, device or socket — which would block
    or never end when read (``/dev/zero``). Cheap: one ``stat``; run it before loading a model."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a directory")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a FIFO, device or socket)")
    return path


def read_rows(path, column: str = "text") -> list[str]:
    """The ``column`` of every row of a local dataset file (parquet, json/jsonl[.gz], txt).

    A ``.txt`` file gives one row per line (line ends stripped). Raises FileNotFoundError or
    ValueError (unknown suffix, missing column, unreadable file) naming the file.
    """
    path = check_text_file(path, "dataset file")
    suffixes = [s.lower() for s in path.suffixes]
    gz = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading parquet needs pyarrow (pip install arhq-jax[eval])"
            ) from None

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        if column not in table.column_names:
            raise ValueError(f"{path} has no {column!r} column (columns: {table.column_names})")
        return [str(x) for x in table.column(column).to_pylist()]
    opener = gzip.open if gz else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        what = "gzipped text" if gz else "text"
        raise ValueError(f"{path}: cannot read it as {what} ({e})") from None
    if kind == ".txt":
        return raw.splitlines()
    if kind not in (".json", ".jsonl"):
        raise ValueError(
            f"{path}: unknown dataset file type; give .parquet, .json, .jsonl (optionally .gz) "
            "or .txt"
        )
    try:
        stripped = raw.lstrip()
        if stripped.startswith("["):
            records = json.loads(raw)
        else:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSON lines ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or column not in rec:
            raise ValueError(f"{path}: record {i} has no {column!r} field")
        rows.append(str(rec[column]))
    return rows


def _hub_rows(name: str) -> list[str]:
    """The rows through ``datasets`` (online, or its local cache)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(
            f"{name}: `datasets` is not installed; `pip install arhq-jax[eval]`, or give a local "
            "copy with data_file / --data-file"
        ) from None
    try:
        if name == "wikitext2":
            repo, config, split = WIKITEXT2_HUB
            ds = load_dataset(repo, config, split=split)
        else:
            repo, shard = C4_HUB
            ds = load_dataset(repo, data_files={"validation": shard}, split="validation")
    except Exception as e:  # offline: ConnectionError, hub errors, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{name}: could not load it through `datasets` ({first}); offline, give a local "
            "copy with data_file / --data-file"
        ) from None
    return [str(x) for x in ds["text"]]


def wikitext2_text(data_file=None) -> str:
    """WikiText-2 raw test text as GPTQ builds it: ``"\\n\\n".join(rows)``.

    ``data_file``: a local copy (parquet / json rows are joined; a ``.txt`` file is taken as the
    joined text itself); None: through ``datasets``.
    """
    if data_file is not None and Path(data_file).suffix.lower() == ".txt":
        text = check_text_file(data_file, "dataset file").read_text(encoding="utf-8")
    else:
        rows = _hub_rows("wikitext2") if data_file is None else read_rows(data_file)
        text = "\n\n".join(rows)
    if not text.strip():
        raise ValueError(f"wikitext2: empty text ({data_file or 'datasets'})")
    return text


def c4_documents(data_file=None) -> list[str]:
    """The documents of C4's first validation shard (local copy or through ``datasets``)."""
    docs = _hub_rows("c4") if data_file is None else read_rows(data_file)
    if not docs:
        raise ValueError(f"c4: no documents ({data_file or 'datasets'})")
    return docs


def c4_windows(
    tokenizer,
    docs: list[str],
    *,
    seq_len: int = PAPER_SEQ_LEN,
    n_samples: int = C4_SAMPLES,
    seed: int = C4_SEED,
) -> np.ndarray:
    """GPTQ's C4 evaluation tokens: ``n_samples`` random windows of ``seq_len``, int32
    ``[n_samples · seq_len]`` (the draws of ``random.seed(seed)`` + ``randint`` as GPTQ makes them).

    A document of exactly ``seq_len`` tokens takes its window at 0 (GPTQ's
    ``randint(0, -1)`` would raise there). Raises ValueError when no document is long enough.
    """
    if seq_len < 2 or n_samples < 1:
        raise ValueError(f"need seq_len >= 2 and n_samples >= 1, got {seq_len}, {n_samples}")
    rng = random.Random(seed)  # the same Mersenne-Twister stream as random.seed(seed)
    lengths: dict[int, int] = {}
    windows = []
    for _ in range(n_samples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = tokenizer(docs[i])["input_ids"]
            lengths[i] = len(ids)
            if len(ids) >= seq_len:
                break
            if len(lengths) == len(docs):  # every document seen, none long enough
                raise ValueError(
                    f"c4: no document tokenizes to {seq_len} tokens (longest: "
                    f"{max(lengths.values())}); give more documents or a shorter seq_len"
                )
        n = len(ids)
        j = rng.randint(0, n - seq_len - 1) if n > seq_len else 0
        windows.append(np.asarray(ids[j : j + seq_len], np.int32))
    return np.concatenate(windows)


def read_dataset(name: str, data_file=None):
    """The raw text of ``name`` before any tokenizer: wikitext2's joined text (str), c4's
    documents (list of str), or None for pydoc (read by ``dataset_tokens``). Reading and
    checking the file needs no model: do it before one loads."""
    if name == "wikitext2":
        return wikitext2_text(data_file)
    if name == "c4":
        return c4_documents(data_file)
    if name == "pydoc":
        return None
    raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")


def dataset_tokens(
    name: str, tokenizer, data_file=None, *, seq_len: int = PAPER_SEQ_LEN, raw=None
) -> np.ndarray:
    """Evaluation token ids int32 ``[T]`` of ``name`` in ``DATASETS``.

    ``seq_len`` matters for c4 only (the window length; evaluate with the same ``seq_len``).
    For pydoc, ``data_file`` None is the built-in corpus's evaluation part, else a text file
    tokenized whole. ``raw``: what ``read_dataset(name, data_file)`` returned (not read again).
    """

    if name == "pydoc":
        ids = ev.load_text_tokens(tokenizer, data_file)
        return ids if data_file is not None else ev.split_tokens(ids)[1]
    if raw is None:
        raw = read_dataset(name, data_file)
    if name == "wikitext2":
        return np.asarray(tokenizer(raw)["input_ids"], np.int32)
    return c4_windows(tokenizer, raw, seq_len=seq_len)
