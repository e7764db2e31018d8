"""Result files: JSON, CSV, Markdown tables and the SNR-by-layer plot.

Everything here is a thin shell over plain dicts; each writer goes through a temporary file and
a rename so that an interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from arhq_jax.storage.atomic import atomic_write  # noqa: F401 (public here too)


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def write_csv(path, rows: Sequence[dict]) -> None:
    """Rows of dicts → CSV (columns in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec) triples; missing values print as ``–``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None else format(v, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """The same table, aligned for a terminal."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["–" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = []
    for j, row in enumerate(cells):
        pairs = zip(row, widths, strict=True)
        out.append("  ".join(c.rjust(w) if j else c.ljust(w) for c, w in pairs))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_snr_by_layer(path, snr_rows: Sequence[dict], title: str) -> None:
    """One line per method: mean SNR (dB) over the projections of each layer, plus the RTN
    baseline of the same setting as a dashed line. ``snr_rows`` items have keys ``method``,
    ``layer``, ``proj``, ``snr_db``, ``baseline_db``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in snr_rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    for m in methods:
        rows = [r for r in snr_rows if r["method"] == m]
        layers = sorted({r["layer"] for r in rows})
        mean = [_mean(r["snr_db"] for r in rows if r["layer"] == ly) for ly in layers]
        gain = [
            _mean(r["snr_db"] - r["baseline_db"] for r in rows if r["layer"] == ly) for ly in layers
        ]
        axes[0].plot(layers, mean, marker="o", ms=3, label=m)
        axes[1].plot(layers, gain, marker="o", ms=3, label=m)
    axes[0].set_ylabel("mean output SNR over projections (dB)")
    axes[1].set_ylabel("gain over RTN, same setting (dB)")
    axes[1].axhline(0.0, color="gray", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- eval results

RESULTS_FORMAT = "arhq-jax-eval-results"


def document(
    r: dict,
    float_row: dict,
    *,
    model: str,
    quantized: str | None,
    weights_only: bool,
    text: str,
    seq_len: int,
    chunks: int,
    reference: str | None,
) -> dict:
    """``eval``'s result as one JSON object: every field its text line shows (what was scored,
    ppl, KL, top-1, predicted tokens, the float ppl) and what it was scored on."""
    return {
        "format": RESULTS_FORMAT,
        "model": str(model),
        "quantized": None if quantized is None else str(quantized),
        "weights_only": bool(weights_only),
        "ppl": r["ppl"],
        "kl": r["kl"],
        "top1": r["top1"],
        "tokens": r["tokens"],
        "float_ppl": float_row["ppl"],
        "text": text,
        "seq_len": seq_len,
        "chunks": chunks,
        "float_reference": reference,
    }


def text_line(doc: dict) -> str:
    """``eval``'s one line of text for ``document``'s object."""
    what = doc["quantized"] or doc["model"]
    what += " (weights only)" if doc["weights_only"] else ""
    cached = " (cached)" if doc.get("float_reference") == "cache" else ""
    return (
        f"{what}: ppl {doc['ppl']:.4f}  KL {doc['kl']:.5f}  top-1 {doc['top1']:.4f}  "
        f"({doc['tokens']} predicted tokens; float ppl {doc['float_ppl']:.4f}{cached})"
    )


def check_writable(path) -> None:
    """Raise unless ``path`` may receive a results file: its directory exists and ``path`` is
    absent or a results file ``write`` wrote (a JSON object of ``RESULTS_FORMAT``); anything
    else is never overwritten (FileExistsError), checked before any work."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"--results {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--results {path}: {parent} is not writable")
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_file():
        raise FileExistsError(f"--results {path} exists and is not a regular file; not replacing")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise FileExistsError(
            f"--results {path} exists and was not written by arhq-jax eval; not overwriting it"
        )


def write(path, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (after ``check_writable`` again: the file may have
    appeared meanwhile)."""
    check_writable(path)
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
