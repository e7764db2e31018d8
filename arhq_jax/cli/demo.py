"""``arhq-jax demo``: SmolLM2-135M, W4A4 in one format, RTN vs SVDQuant vs ARHQ at rank 32, and
the ``best-w4a4`` preset (NVFP4 W4A4, its own recipe: docs/beyond_arhq.md) as a fourth row.

Calibrates on the first 60 % of the pydoc corpus and evaluates on the rest (disjoint), then
prints one table (perplexity, KL and top-1 against the float model, mean layer SNR and its gain
over RTN, checkpoint size, quantize time) and writes JSON, CSV, Markdown and a PNG plot of SNR by
layer to ``out_dir``.

The "float" SmolLM2 is itself dequantized from the GGUF's Q4_1 (every weight already lies on a
per-32 affine 4-bit grid), which makes RTN-NVFP4 behave differently than on a bf16 checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from arhq_jax.checkpoint.store import tree_nbytes
from arhq_jax.evaluation import report
from arhq_jax.evaluation.layer_snr import layer_snr
from arhq_jax.evaluation.pipeline import calibration_ids, evaluate_models, load_corpus
from arhq_jax.run.config import PRESETS, QuantConfig, preset, takes
from arhq_jax.run.quantize import quantize_model
from converters import load_model

COLUMNS = (
    ("method", "method", "s"),
    ("ppl", "ppl", ".3f"),
    ("kl", "KL (nats)", ".4f"),
    ("top1", "top-1", ".4f"),
    ("snr_db", "mean SNR dB", ".2f"),
    ("gain_db", "gain vs RTN dB", "+.2f"),
    ("mib", "size MiB", ".1f"),
    ("quant_s", "quantize s", ".1f"),
)


# The demo's rows: the three methods at --rank and --format, then the best-w4a4 preset.
METHODS = ("rtn", "svdquant", "arhq", "best-w4a4")


def run_demo(
    out_dir="runs/demo",
    fmt: str = "nvfp4",
    methods=METHODS,
    rank: int = 32,
    calib_tokens: int = 16384,
    max_chunks: int = 16,
    seq_len: int = 512,
    snr_tokens: int = 2048,
    model: str = "smollm2",
    progress: bool = True,
) -> list[dict]:
    """Run the demo and write its files; returns the table rows."""

    t_start = time.perf_counter()
    out = Path(out_dir)
    m = load_model(model)
    print(
        f"model: {model} ({m.cfg.num_layers} layers, hidden {m.cfg.hidden_size}), "
        f"loaded in {time.perf_counter() - t_start:.1f}s"
    )
    corpus = load_corpus(m.tokenizer)
    calib = calibration_ids(corpus.calib, calib_tokens, seq_len)
    snr_ids = calibration_ids(corpus.eval, snr_tokens, seq_len)  # held-out: from the eval part
    print(
        f"tokens: {len(corpus.calib)} calibration (using {calib.size}), "
        f"{len(corpus.eval)} evaluation (disjoint)"
    )

    qmodels, rows, snr_rows, diag_rows = {}, [], [], []
    for method in methods:
        if method in PRESETS:  # a named recipe (its own rank and formats)
            qcfg = preset(method)
        else:
            qcfg = QuantConfig(method=method, w_fmt=fmt, act_fmt=fmt, **takes(method, rank=rank))
        t0 = time.perf_counter()
        res = quantize_model(m.params, m.cfg, calib, qcfg, progress=progress)
        quant_s = time.perf_counter() - t0
        qmodels[method] = res.params
        snr = layer_snr(
            m.params, res.params, m.cfg, snr_ids, w_fmt=fmt, act_fmt=fmt, progress=progress
        )
        snr_rows += [{"method": method, **r} for r in snr]
        diag_rows += [{"method": method, **d} for d in res.projections]
        rows.append(
            {
                "method": method,
                "rank": qcfg.rank if qcfg.uses_branch else 0,
                "snr_db": float(np.mean([r["snr_db"] for r in snr])),
                "gain_db": float(np.mean([r["gain_db"] for r in snr])),
                "mib": tree_nbytes(res.params) / 2**20,
                "quant_s": quant_s,
                **{k: round(v, 3) for k, v in res.timings.items()},
            }
        )

    scores = evaluate_models(
        qmodels,
        m.params,
        m.cfg,
        corpus.eval,
        seq_len=seq_len,
        max_chunks=max_chunks,
        progress=progress,
    )
    for r in rows:
        r.update(scores[r["method"]])
    fp = {"method": "float", **scores["float"], "mib": tree_nbytes(m.params) / 2**20}
    fp.update(kl=0.0, top1=1.0)
    table = [fp, *rows]

    title = f"SmolLM2-135M, {fmt} W4A4, rank {rank}, {calib.size} calibration tokens"
    print()
    print(title)
    print(report.text_table(table, COLUMNS))
    print(
        f"(perplexity over {scores['float']['tokens']} predicted tokens, seq_len {seq_len}; "
        f"SNR over {snr_ids.size} held-out tokens; total {time.perf_counter() - t_start:.0f}s)"
    )
    wins = _pair_wins(snr_rows, "arhq", "svdquant")
    if wins is not None:
        print(f"ARHQ SNR >= SVDQuant SNR on {wins[0]}/{wins[1]} (layer, projection) pairs")

    meta = {
        "title": title,
        "format": fmt,
        "rank": rank,
        "calib_tokens": int(calib.size),
        "eval_tokens": scores["float"]["tokens"],
        "corpus": corpus.source,
    }
    report.write_json(out / "summary.json", {"meta": meta, "table": table})
    report.write_csv(out / "summary.csv", table)
    report.write_csv(out / "layer_snr.csv", snr_rows)
    report.write_csv(out / "diagnostics.csv", diag_rows)
    report.atomic_write(
        out / "summary.md", f"**{title}**\n\n" + report.markdown_table(table, COLUMNS) + "\n"
    )
    report.plot_snr_by_layer(out / "snr_by_layer.png", snr_rows, title)
    print(f"wrote {out}/summary.{{json,csv,md}}, layer_snr.csv, diagnostics.csv, snr_by_layer.png")
    return table


def _pair_wins(snr_rows, a: str, b: str):
    sa = {(r["layer"], r["proj"]): r["snr_db"] for r in snr_rows if r["method"] == a}
    sb = {(r["layer"], r["proj"]): r["snr_db"] for r in snr_rows if r["method"] == b}
    keys = sa.keys() & sb.keys()
    if not keys:
        return None
    return sum(sa[k] >= sb[k] for k in keys), len(keys)
