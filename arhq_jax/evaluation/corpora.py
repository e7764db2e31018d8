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

import dataclasses
import gzip
import importlib
import inspect
import json
import random
import stat
from pathlib import Path

import numpy as np

import arhq_jax.evaluation.metrics as ev
from arhq_jax.evaluation.pipeline import calibration_ids

DATASETS = ("pydoc", "wikitext2", "c4")
PAPER_SEQ_LEN = 2048
C4_SAMPLES = 256
C4_SEED = 0
WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
C4_HUB = ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz")
C4_TRAIN_HUB = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")


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
    return [str(x) for x in read_records(path, column)]


def _file_kind(path: Path) -> tuple[str, bool]:
    """(``".parquet"`` | ``".json"`` | ``".jsonl"`` | ``".txt"`` | other suffix, gzipped?)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    return kind, gz


def read_records(path, column: str = "text") -> list:
    """The ``column`` value of every row of a local dataset file, as stored (a string, or e.g.
    a list of chat messages); a ``.txt`` file gives one string per line. Errors as
    ``read_rows``."""
    path = check_text_file(path, "dataset file")
    kind, gz = _file_kind(path)
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
        return list(table.column(column).to_pylist())
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
        rows.append(rec[column])
    return rows


def _hub_rows(name: str, split: str = "test", local: str = "data_file / --data-file") -> list[str]:
    """The rows through ``datasets`` (online, or its local cache): the evaluation split
    (``"test"``: wikitext2's test split, c4's first validation shard) or ``"train"`` (the
    calibration data: wikitext2's train split, c4's first train shard, as GPTQ calibrates)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(
            f"{name}: `datasets` is not installed; `pip install arhq-jax[eval]`, or give a local "
            f"copy with {local}"
        ) from None
    try:
        if name == "wikitext2":
            repo, config, test = WIKITEXT2_HUB
            ds = load_dataset(repo, config, split=test if split == "test" else "train")
        else:
            repo, shard = C4_HUB if split == "test" else C4_TRAIN_HUB
            part = "validation" if split == "test" else "train"
            ds = load_dataset(repo, data_files={part: shard}, split=part)
    except Exception as e:  # offline: ConnectionError, hub errors, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{name}: could not load it through `datasets` ({first}); offline, give a local "
            f"copy with {local}"
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


# ---------------------------------------------------------------- calibration sources
#
# ``quantize --calib-dataset SPEC``: SPEC is one source or several, comma-separated, each
# ``NAME`` or ``NAME:SHARE``. A NAME is ``pydoc`` (the first 60 % of the pydoc corpus, the
# default), ``docstrings`` (the docstrings of standard-library modules, ``docstrings_corpus``;
# offline), ``wikitext2`` / ``c4`` (their train data through ``datasets``, as GPTQ calibrates;
# offline a one-line error, as for ``eval``), or a local file: ``.txt`` (the whole file is one
# document, exactly as ``--calib-text``), ``.jsonl`` / ``.json`` (optionally ``.gz``) or
# ``.parquet`` rows whose ``field`` holds the text. A source's documents are joined with
# ``"\n\n"`` (GPTQ's wikitext2 join) and tokenized once with the tokenizer's defaults, so a
# file of records and a text file holding those records joined give the same tokens. With
# ``chat``, each document goes through the tokenizer's chat template first: a string as one user
# turn, a list of ``{"role", "content"}`` messages as the conversation. The calibration
# sequences are split between the sources by their shares (equal without shares; the largest
# remainders round), each source giving its first tokens, in the order given.

CALIB_NAMES = ("pydoc", "wikitext2", "c4", "docstrings")
CALIB_FILE_KINDS = (".txt", ".jsonl", ".json", ".parquet")
DOC_JOIN = "\n\n"


@dataclasses.dataclass(frozen=True)
class CalibSource:
    """One calibration source: ``name`` (``CALIB_NAMES`` or a file path) and its share of the
    sequences (None: an equal share)."""

    name: str
    share: float | None = None

    def __str__(self) -> str:
        return self.name if self.share is None else f"{self.name}:{self.share:g}"


def parse_calib_sources(spec: str) -> list[CalibSource]:
    """``"a.txt,b.jsonl"`` or ``"a.txt:0.7,b.jsonl:0.3"`` → ``CalibSource`` s. Shares are all
    given or all left out, each > 0 (they need not sum to 1: they are normalized). ValueError
    naming the bad item; nothing is read here."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"calibration dataset: expected a name or file, got {spec!r}")
    out = []
    for item in spec.split(","):
        item = item.strip()
        name, share = item, None
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                share = float(tail)
            except ValueError:
                share = None  # a ':' inside a file name
            else:
                name = head
                if not (share > 0 and share != float("inf")):
                    raise ValueError(f"calibration dataset {item!r}: the share must be > 0")
        if not name:
            raise ValueError(f"calibration dataset: empty item in {spec!r}")
        if name not in CALIB_NAMES and _file_kind(Path(name))[0] not in CALIB_FILE_KINDS:
            raise ValueError(
                f"calibration dataset {name!r}: give {', '.join(CALIB_NAMES)} or a "
                ".txt/.jsonl/.json/.parquet file"
            )
        out.append(CalibSource(name, share))
    given = [s.share is not None for s in out]
    if any(given) and not all(given):
        raise ValueError(f"calibration dataset {spec!r}: give a share for every source or none")
    if len({s.name for s in out}) != len(out):
        raise ValueError(f"calibration dataset {spec!r} names a source twice")
    return out


def _check_document(doc, where: str, chat: bool):
    """A document: a string, or (``chat``) a list of ``{"role": str, "content": str}``."""
    if isinstance(doc, str):
        return doc
    if chat and isinstance(doc, list):
        for m in doc:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: a chat message is not {{'role': str, 'content': str}}: {m!r:.80}"
                )
        return [{"role": m["role"], "content": m["content"]} for m in doc]
    what = "a string or a list of chat messages" if chat else "a string"
    raise ValueError(f"{where} is not {what} (got {type(doc).__name__})")


def read_calib_documents(source: CalibSource, field: str = "text", chat: bool = False):
    """The documents of one source before any tokenizer (so it runs before the model loads):
    a list of strings (or chat message lists), or None for ``pydoc`` (tokens come from
    ``eval.pydoc_corpus``). ValueError / OSError naming the source."""
    name = source.name
    if name == "pydoc":
        if chat:
            raise ValueError("--chat-template does not apply to the pydoc corpus")
        return None
    if name == "docstrings":
        return docstrings_corpus()
    if name in ("wikitext2", "c4"):
        rows = _hub_rows(name, "train", "a local file (--calib-dataset FILE.parquet or .jsonl)")
        docs = [str(r) for r in rows]
        if name == "wikitext2":
            docs = [DOC_JOIN.join(docs)]
        return docs
    path = check_text_file(name, "calibration file")
    kind, _ = _file_kind(path)
    if kind == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(
                f"calibration file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                f"offset {e.start})"
            ) from None
    docs = read_records(path, field)
    return [_check_document(d, f"{path}: record {i}'s {field!r}", chat) for i, d in enumerate(docs)]


# The standard-library modules whose docstrings make the ``docstrings`` calibration source: pure
# Python modules present in every CPython build, none of them a source of the pydoc corpus
# (``pydoc_data.topics``, the language reference) and none quoting a licence or a copyright
# notice (``unittest``, ``codecs`` and ``logging`` carry one in their module docstrings, so
# they are left out).
DOCSTRING_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "http.client", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "mailbox", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "platform", "pprint", "profile", "pstats", "queue", "random", "re",
    "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket", "stat",
    "statistics", "string", "struct", "subprocess", "sysconfig", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "typing",
    "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.etree.ElementTree", "zipfile",
)  # fmt: skip


def docstrings_corpus() -> list[str]:
    """The ``docstrings`` calibration source: one document per module of ``DOCSTRING_MODULES``,
    its docstring then ``name: docstring`` of each public member defined in it (sorted by name;
    docstrings of 40 characters or less left out), as ``inspect.getdoc`` cleans them. Offline
    and deterministic for a given Python version (377k characters on 3.11.7)."""
    docs = []
    for name in DOCSTRING_MODULES:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""]
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for n in sorted(public):
            obj = getattr(mod, n, None)
            if obj is None or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                parts.append(f"{n}: {doc}")
        docs.append(DOC_JOIN.join(p for p in parts if p))
    return docs


def _render(tokenizer, doc, chat: bool) -> str:
    if not chat:
        return doc
    messages = [{"role": "user", "content": doc}] if isinstance(doc, str) else doc
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-template: the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def source_tokens(tokenizer, source: CalibSource, docs, chat: bool = False) -> np.ndarray:
    """One source's token ids int32 ``[T]``: its documents (rendered through the chat template
    under ``chat``) joined with ``DOC_JOIN`` and tokenized once; ``pydoc`` (docs None): the
    corpus's calibration part (the first 60 %, as without ``--calib-dataset``)."""
    if docs is None:
        if chat:
            raise ValueError("--chat-template does not apply to the pydoc corpus")
        return ev.split_tokens(ev.load_text_tokens(tokenizer, None))[0]
    text = DOC_JOIN.join(_render(tokenizer, d, chat) for d in docs)
    if not text.strip():
        raise ValueError(f"calibration dataset {source.name}: empty text")
    return np.asarray(tokenizer(text)["input_ids"], np.int32)


def sequence_shares(sources: list[CalibSource], n_seq: int) -> list[int]:
    """Sequences per source: ``n_seq`` split by the shares (equal when none are given), the
    remainder going to the largest fractional parts (earlier sources first on ties)."""
    shares = [1.0 if s.share is None else s.share for s in sources]
    total = sum(shares)
    exact = [n_seq * w / total for w in shares]
    counts = [int(x) for x in exact]
    order = sorted(range(len(sources)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n_seq - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_from_sources(
    tokenizer,
    read: list[tuple[CalibSource, list | None]],
    n_tokens: int,
    seq_len: int,
    *,
    chat: bool = False,
    vocab_size: int | None = None,
) -> np.ndarray:
    """Calibration ids int32 ``[n_tokens // seq_len, seq_len]`` from ``read`` (the sources and
    their ``read_calib_documents``): each source's first ``count · seq_len`` tokens
    (``sequence_shares``) as sequences, in the order given. One source is exactly
    ``pipeline.calibration_ids`` of its tokens. ValueError when a source is too short (naming
    it and its token count) or has ids outside the vocabulary."""
    if seq_len < 2 or n_tokens < seq_len:
        raise ValueError(
            f"calibration needs n_tokens >= seq_len >= 2, got {n_tokens} tokens, seq_len {seq_len}"
        )
    n_seq = n_tokens // seq_len
    counts = sequence_shares([s for s, _ in read], n_seq)
    parts = []
    for (src, docs), n in zip(read, counts, strict=True):
        if n == 0:
            raise ValueError(
                f"calibration dataset {src}: its share of {n_seq} sequences rounds to 0; give "
                "more --calib-tokens or a larger share"
            )
        ids = source_tokens(tokenizer, src, docs, chat)
        what = f"calibration dataset {src.name}"
        parts.append(calibration_ids(ids, n * seq_len, seq_len, source=what, vocab_size=vocab_size))
    return np.concatenate(parts, axis=0)
