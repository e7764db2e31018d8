"""Result files: JSON, CSV, Markdown tables and the SNR-by-layer plot.

Everything here is a thin shell over plain dicts; each writer goes through a temporary file and
a rename so that an interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

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
