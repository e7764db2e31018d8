"""Quality against stored bits per weight: every method in NVFP4 W4A4 and W4A16, as one picture.

    .venv/bin/python benchmarks/pareto.py --second-text /usr/share/common-licenses/GPL-3
    .venv/bin/python benchmarks/pareto.py --only rtn,arhq,best-w4a4 --arhq-ranks 8,32
    .venv/bin/python benchmarks/pareto.py --tiny --out /tmp/p      # the tiny random model

Each method is quantized once on the same calibration ids (compare.py's ``load_bench``: the model
loaded once, the first ``--calib-tokens`` of the pydoc calibration part) and scored on the pydoc
evaluation part and on ``--second-text`` in two settings:

- **W4A4**: the recipe as it is served on FP4 tensor cores (activations quantized).
- **W4A16**: weight-only serving, activations unquantized (FP4 Marlin on Hopper/Ada). A method
  with a weight-only recipe (activation format ``none``) whose weights depend on the calibration
  is quantized again in that recipe (GPTQ, SERQ, ResQ); the others are their W4A4 checkpoint
  served weight-only (``linears.quantized.weights_only``): RTN and SVDQuant, whose weights do
  not depend on the activation format (``SAME_WEIGHTS``, checked by the tests), and the methods
  that have no weight-only recipe (ARHQ, SmoothQuant, the W4A4 presets). AWQ and the best-w4a16
  preset are weight-only recipes and have only the W4A16 point.

Bits per weight are compare.py's: the stored bytes of the seven projections of every layer
(codes, block scales, global scales, zero points, low-rank factors in their stored dtype,
smoothing and permutation vectors) over their weight count, of the model as it is evaluated.
The presets come from ``arhq_jax.run.config.PRESETS`` as they are defined when the script runs.

Writes ``<out>/<name>.json`` (every row, rewritten after each method), ``<name>.md`` (the table)
and ``<name>.png`` (perplexity / float against bits per weight, one panel per setting × text;
skipped with a note when matplotlib is missing).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see arhq_jax/cli/main.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from arhq_jax.checkpoint.store import tree_nbytes  # noqa: E402
from arhq_jax.evaluation import report  # noqa: E402
from arhq_jax.linears.quantized import weights_only  # noqa: E402
from arhq_jax.run.config import PRESETS, QuantConfig  # noqa: E402
from arhq_jax.run.quantize import quantize_model  # noqa: E402
from benchmarks import compare  # noqa: E402

NV = {"w_fmt": "nvfp4", "act_fmt": "nvfp4"}
LR = {"factor_dtype": compare.FACTOR}
# The methods in the order they run (cheap and telling first, so that a run cut short has the
# frontier's outline): the low-rank family, GPTQ, the presets, then the other baselines.
METHODS = (
    "rtn",
    "svdquant",
    "arhq",
    "gptq",
    "best-w4a4",
    "best-w4a16",
    "best-w4a4-lean",
    "smoothquant",
    "awq",
    "serq",
    "resq",
)
TINY_METHODS = ("rtn", "arhq", "gptq")
# Methods whose quantized weights do not depend on the activation format (no activation
# statistics enter them): their W4A16 point is their W4A4 checkpoint served weight-only, which
# is what quantizing them weight-only would store (tests/benchmarks/test_pareto.py checks it).
SAME_WEIGHTS = {"rtn", "svdquant"}
SETTINGS = ("W4A4", "W4A16")
COLUMNS = (
    ("name", "method", "s"),
    ("setting", "setting", "s"),
    ("formats", "W / A", "s"),
    ("bits", "bits/w", ".3f"),
    ("ppl", "ppl", ".3f"),
    ("ratio", "× float", ".3f"),
    ("kl", "KL", ".4f"),
)
SECOND_COLUMNS = (("ppl2", "ppl²", ".3f"), ("ratio2", "× float²", ".3f"), ("kl2", "KL²", ".4f"))
TAIL_COLUMNS = (("served", "W4A16 from", "s"), ("quant_s", "quantize s", ".0f"))


class InputError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


def points(methods, arhq_ranks, svdquant_ranks) -> list[dict]:
    """The quantized models to make: ``{"name", "method", "w4a4": kw | None, "w4a16": kw |
    None}``, one per method and rank. ``w4a16`` is the weight-only recipe quantized on its own,
    None where the W4A16 point is the W4A4 checkpoint served weight-only (or, for a weight-only
    recipe, ``w4a4`` is None)."""
    out = []
    for meth in methods:
        if meth in PRESETS:
            kw = dict(PRESETS[meth])
            four = kw if kw.get("act_fmt") is not None else None
            out.append({"name": meth, "method": meth, "w4a4": four, "w4a16": _w4a16(meth, kw)})
        elif meth in ("svdquant", "arhq"):
            ranks = svdquant_ranks if meth == "svdquant" else arhq_ranks
            for r in ranks:
                kw = dict(method=meth, rank=r, **NV, **LR)
                out.append(
                    {"name": f"{meth} r{r}", "method": meth, "w4a4": kw, "w4a16": _w4a16(meth, kw)}
                )
        elif meth == "awq":  # weight-only int4-asym g128; lm_head float like every other row
            kw = dict(method="awq", quantize_lm_head=False)
            out.append({"name": "awq", "method": meth, "w4a4": None, "w4a16": kw})
        elif meth == "resq":  # int4 only (its top 1/8 of the channels at int8)
            kw = dict(method="resq")
            out.append({"name": "resq", "method": meth, "w4a4": kw, "w4a16": _w4a16(meth, kw)})
        else:  # rtn, gptq, smoothquant, serq: NVFP4
            kw = dict(method=meth, **NV)
            out.append({"name": meth, "method": meth, "w4a4": kw, "w4a16": _w4a16(meth, kw)})
    return out


def _w4a16(method: str, kw: dict) -> dict | None:
    """The weight-only recipe of ``kw`` when it is quantized on its own: ``kw`` itself for a
    weight-only recipe, ``kw`` with activation format None when the method has that recipe and
    its weights depend on it; None when the W4A16 point is the W4A4 checkpoint served
    weight-only."""
    if QuantConfig(**kw).act_fmt is None:
        return kw
    if method in SAME_WEIGHTS:
        return None
    try:
        QuantConfig(**{**kw, "act_fmt": None})
    except ValueError:  # no weight-only recipe (ARHQ, SmoothQuant)
        return None
    return {**kw, "act_fmt": None}


def parse_methods(only: str | None, tiny: bool) -> list[str]:
    """``--only``'s method names (in ``METHODS`` order), or the default set."""
    if only is None:
        return list(TINY_METHODS if tiny else METHODS)
    names = [s.strip() for s in only.split(",") if s.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise InputError(f"unknown method {bad[0] if bad else only!r}; known: {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


def parse_ranks(text: str, what: str) -> list[int]:
    try:
        ranks = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(
            f"{what} must be comma-separated positive integers, got {text!r}"
        ) from None
    if not ranks or min(ranks) < 1:
        raise InputError(f"{what} must be comma-separated positive integers, got {text!r}")
    return sorted(set(ranks))


def make_row(point: dict, setting: str, params, cfg, qcfg: QuantConfig, quant_s: float, served):
    """One JSON row (scores added later): the model's recipe, formats and stored bits."""
    return {
        "name": point["name"],
        "method": point["method"],
        "setting": setting,
        "formats": compare._formats(qcfg) if setting == "W4A4" else _w_only(qcfg),
        "served": served,
        "rank": qcfg.rank if (qcfg.uses_branch or qcfg.method == "serq") else 0,
        "bits": compare.projection_bits(params, cfg),
        "mib": tree_nbytes(params) / 2**20,
        "quant_s": quant_s,
        "config": qcfg.to_dict(),
    }


def _w_only(qcfg: QuantConfig) -> str:
    return compare._formats(qcfg).split(" / ")[0] + " / 16-bit"


def add_scores(row: dict, score: dict, fp: dict) -> None:
    """``row`` with its scores and their ratios to the float model's."""
    row.update(score)
    row["ratio"] = row["ppl"] / fp["ppl"]
    if "ppl2" in row:
        row["ratio2"] = row["ppl2"] / fp["ppl2"]


def quantize_point(point: dict, bench, log=print) -> tuple[list[dict], dict]:
    """The W4A4 and W4A16 models of ``point`` (each distinct recipe quantized once) and their
    rows, not yet scored: ``(rows, {"<name> | <setting>": params})``."""
    m, models, rows = bench.model, {}, []
    w4a4 = None
    if point["w4a4"] is not None:
        qcfg = QuantConfig(**point["w4a4"])
        log(f"  {point['name']} W4A4: {qcfg.label()} ...")
        t0 = time.perf_counter()
        w4a4 = quantize_model(m.params, m.cfg, bench.calib, qcfg, progress=False).params
        dt = time.perf_counter() - t0
        rows.append(make_row(point, "W4A4", w4a4, m.cfg, qcfg, dt, None))
        models[f"{point['name']} | W4A4"] = w4a4
    if point["w4a16"] is not None:
        qcfg = QuantConfig(**point["w4a16"])
        log(f"  {point['name']} W4A16: {qcfg.label()} ...")
        t0 = time.perf_counter()
        w16 = quantize_model(m.params, m.cfg, bench.calib, qcfg, progress=False).params
        dt, served = time.perf_counter() - t0, "weight-only recipe"
    else:
        qcfg, w16, dt = QuantConfig(**point["w4a4"]), weights_only(w4a4), 0.0
        served = "W4A4 checkpoint"
    rows.append(make_row(point, "W4A16", w16, m.cfg, qcfg, dt, served))
    models[f"{point['name']} | W4A16"] = w16
    return rows, models


def run_group(group: list[dict], bench, log=print) -> list[dict]:
    """Quantize the points of ``group`` (one method's ranks) and score all their models in one
    evaluation pass (the float logits of each chunk computed once for all of them)."""
    rows, models = [], {}
    for point in group:
        r, mo = quantize_point(point, bench, log)
        rows += r
        models.update(mo)
    scores = bench.score(models)
    for row in rows:
        add_scores(row, scores[f"{row['name']} | {row['setting']}"], bench.fp)
        log(
            f"    {row['name']} {row['setting']}: {row['bits']:.3f} bits/w  ppl {row['ppl']:.3f} "
            f"(×{row['ratio']:.3f})  quantize {row['quant_s']:.0f}s"
        )
    return rows


def float_rows(bench) -> list[dict]:
    """The float model as a row of each setting (ratio 1 by definition)."""
    m = bench.model
    bits = 8 * jax.numpy.dtype(m.cfg.param_dtype).itemsize
    base = {
        "name": "float",
        "method": "float",
        "formats": m.cfg.param_dtype,
        "served": None,
        "rank": 0,
        "bits": bits,
        "mib": tree_nbytes(m.params) / 2**20,
        "quant_s": 0.0,
    }
    out = []
    for s in SETTINGS:
        row = {**base, "setting": s, **bench.fp, "kl": 0.0, "top1": 1.0}
        add_scores(row, {}, bench.fp)
        out.append(row)
    return out


def _columns(meta) -> tuple:
    return COLUMNS + (SECOND_COLUMNS if meta.get("second_text") else ()) + TAIL_COLUMNS


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows in table order: by setting, then by bits per weight (float last)."""
    key = {s: i for i, s in enumerate(SETTINGS)}
    return sorted(rows, key=lambda r: (key[r["setting"]], r["name"] == "float", r["bits"]))


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per quantized model and its W4A16 twin: bits and ratios of both settings side by
    side, by W4A4 bits (weight-only recipes by their W4A16 bits), float last."""
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(r["name"], {"name": r["name"]})
        tag = "4" if r["setting"] == "W4A4" else "16"
        for k in ("bits", "ratio", "ratio2"):
            d[f"{k}_{tag}"] = r.get(k)
    return sorted(
        out.values(),
        key=lambda d: (d["name"] == "float", d.get("bits_4") or d["bits_16"], d["name"]),
    )


def _summary_columns(meta) -> tuple:
    two = bool(meta.get("second_text"))
    text2 = Path(meta["second_text"]).name if two else ""
    cols = [("name", "method", "s")]
    for tag, s in (("4", "W4A4"), ("16", "W4A16")):
        cols += [
            (f"bits_{tag}", f"{s} bits/w", ".3f"),
            (f"ratio_{tag}", f"{s} × float, pydoc", ".3f"),
        ]
        cols += [(f"ratio2_{tag}", f"{s} × float, {text2}", ".3f")] if two else []
    return tuple(cols)


def write_results(out: Path, name: str, rows, meta, total_s: float) -> bool:
    """``name``.json, .md and .png under ``out``; returns whether the PNG was written."""
    meta = {**meta, "total_s": round(total_s, 1)}
    report.write_json(out / f"{name}.json", {"meta": meta, "rows": rows})
    second = (
        f" and on {meta['second_text']} ({meta['second_tokens']} tokens, columns ²)"
        if meta.get("second_text")
        else ""
    )
    title = (
        f"{meta['model']}: {meta['calib_tokens']} calibration tokens; perplexity on "
        f"{meta['eval_tokens']} pydoc evaluation tokens{second}; × float = ppl / float ppl"
    )
    notes = (
        "\n\nbits/w: stored bits per weight of the seven projections (codes, block and global "
        "scales, zero points, bf16 low-rank factors, smoothing/permutation vectors). W4A16: "
        "activations unquantized; 'weight-only recipe' = quantized again with activation format "
        "none, 'W4A4 checkpoint' = the W4A4 model served weight-only. quantize s: wall time of "
        f"quantize_model, compilation included ({meta['devices']}).\n"
    )
    md = (
        f"**{title}**\n\n"
        + report.markdown_table(summary_rows(rows), _summary_columns(meta))
        + "\n\n"
        + report.markdown_table(table_rows(rows), _columns(meta))
        + notes
    )
    report.atomic_write(out / f"{name}.md", md)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    plot(out / f"{name}.png", rows, meta)
    return True


def plot(path: Path, rows: list[dict], meta: dict) -> None:
    """Perplexity / float against bits per weight: one panel per setting × text, one curve per
    method (its points by bits; a single point is a marker), the float model as the line y = 1."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [("ratio", "pydoc")] + (
        [("ratio2", Path(meta["second_text"]).name)] if meta.get("second_text") else []
    )
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "float"))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    style = {m: (cmap(i % cmap.N), "osD^v<>phX*P"[i % 11]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(
        len(SETTINGS), len(texts), figsize=(6.2 * len(texts), 4.6 * len(SETTINGS)), squeeze=False
    )
    for i, setting in enumerate(SETTINGS):
        for j, (key, text) in enumerate(texts):
            ax = axes[i][j]
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            for meth in methods:
                pts = sorted(
                    (
                        r
                        for r in rows
                        if r["method"] == meth
                        and r["setting"] == setting
                        and r.get(key) is not None
                    ),
                    key=lambda r: r["bits"],
                )
                if not pts:
                    continue
                color, marker = style[meth]
                ax.plot(
                    [r["bits"] for r in pts],
                    [r[key] for r in pts],
                    color=color,
                    marker=marker,
                    ms=6,
                    lw=1.4,
                    ls="-" if len(pts) > 1 else "none",
                    label=meth,
                )
                if len(pts) > 1:  # the rank of each point of a curve
                    for r in pts:
                        ax.annotate(
                            f"r{r['rank']}",
                            (r["bits"], r[key]),
                            fontsize=7,
                            xytext=(3, 3),
                            textcoords="offset points",
                            color=color,
                        )
            ax.set_title(f"{setting}, {text}")
            ax.set_xlabel("stored bits per weight (seven projections)")
            ax.set_ylabel("perplexity / float")
            ax.grid(alpha=0.3, which="both")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle(
        f"{meta['model']}: {meta['calib_tokens']} calibration tokens, "
        f"{meta['eval_tokens']} evaluation tokens per text"
    )
    fig.tight_layout(rect=(0, 0.06 if len(labels) <= 6 else 0.09, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    report.atomic_write(path, buf.getvalue())


def rewrite(src: Path, out: Path, name: str) -> int:
    """The table and the plot of an earlier run, from its JSON (its rows and meta unchanged)."""
    try:
        doc = json.loads(src.read_text(encoding="utf-8"))
        rows, meta = doc["rows"], doc["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"pareto.py: error: cannot read results {src}: {e}", file=sys.stderr)
        return 2
    png = write_results(out, name, rows, meta, meta.get("total_s", 0.0))
    print(f"wrote {out}/{name}.{{json,md{',png' if png else ''}}}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=8, help="evaluation chunks per text")
    ap.add_argument(
        "--only", default=None, help=f"comma-separated methods of: {', '.join(METHODS)}"
    )
    ap.add_argument("--arhq-ranks", default=None, help="ARHQ's ranks (default 8,32,64; tiny 4,8)")
    ap.add_argument("--svdquant-ranks", default=None, help="SVDQuant's (default 8,32; tiny 4)")
    ap.add_argument("--second-text", default=None, help="also score on this UTF-8 text file")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="pareto", help="results file stem (.json/.md/.png)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model (bench_tiny)")
    ap.add_argument(
        "--from-json",
        default=None,
        help="only rewrite the table and the plot (<out>/<name>.md/.png) from this results JSON",
    )
    args = ap.parse_args(argv)
    if args.from_json is not None:
        return rewrite(Path(args.from_json), Path(args.out), args.name)

    t_start = time.perf_counter()
    try:
        methods = parse_methods(args.only, args.tiny)
        arhq = args.arhq_ranks or ("4,8" if args.tiny else "8,32,64")
        svd = args.svdquant_ranks or ("4" if args.tiny else "8,32")
        todo = points(
            methods, parse_ranks(arhq, "--arhq-ranks"), parse_ranks(svd, "--svdquant-ranks")
        )
        if args.second_text is not None:  # before the model loads: a typo costs nothing
            p = Path(args.second_text)
            if not p.is_file():
                raise FileNotFoundError(f"text file not found: {p}")
        bench = compare.load_bench(args)
    except (OSError, ValueError) as e:  # unknown method, missing/short text, bad sizes
        print(f"pareto.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.model if not args.tiny else 'tiny'}: loaded and float-evaluated in "
        f"{time.perf_counter() - t_start:.0f}s; float ppl {bench.fp['ppl']:.3f} on "
        f"{bench.fp['tokens']} tokens; {bench.calib.size} calibration tokens; "
        f"{len(todo)} quantized models to make",
        flush=True,
    )
    meta = {
        "model": "tiny" if args.tiny else args.model,
        "calib_tokens": int(bench.calib.size),
        "calib_seq_len": args.calib_seq_len,
        "eval_tokens": bench.fp["tokens"],
        "seq_len": args.seq_len,
        "max_chunks": args.max_chunks,
        "second_text": args.second_text,
        "second_tokens": bench.fp.get("tokens2"),
        "corpus": bench.corpus.source,
        "methods": methods,
        "presets": {k: PRESETS[k] for k in methods if k in PRESETS},
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    out, rows = Path(args.out), float_rows(bench)
    for i, meth in enumerate(methods):
        print(f"[{i + 1}/{len(methods)}] {meth}", flush=True)
        group = [p for p in todo if p["method"] == meth]
        rows += run_group(group, bench, log=lambda s: print(s, flush=True))
        write_results(out, args.name, rows, meta, time.perf_counter() - t_start)
    png = write_results(out, args.name, rows, meta, time.perf_counter() - t_start)
    print()
    print(report.text_table(table_rows(rows), _columns(meta)))
    what = "md,json,png" if png else "md,json; no matplotlib, no plot"
    print(f"total {time.perf_counter() - t_start:.0f}s; wrote {out}/{args.name}.{{{what}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
