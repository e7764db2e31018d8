"""Static vs dynamic NVFP4 activation scales on SmolLM2-135M.

    python benchmarks/static_scales.py [--calib-tokens 16384] [--out benchmarks/results/...]

Quantizes NVFP4 W4A4 with RTN and ARHQ (rank 32) four ways: today's recipe (dynamic activation
scale, one weight global scale per projection), dynamic + fused weight scales, the new default
(static activation scales, fused weight scales), and static with per-projection weight scales.
Scores each on the pydoc evaluation part as ``arhq-jax eval`` does (seq-len 512, 16 chunks,
batch 2), then the batch dependence of the issue's command (RTN, seq-len 256, 4 chunks, batch 1
vs 4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from arhq_jax.evaluation.pipeline import calibration_ids, evaluate_models, load_corpus  # noqa: E402
from arhq_jax.run.config import QuantConfig, takes  # noqa: E402
from arhq_jax.run.quantize import quantize_model  # noqa: E402
from converters import load_model  # noqa: E402

VARIANTS = {
    "dynamic (today)": {"act_scale": "dynamic", "fused_w_scale": False},
    "dynamic + fused W scale": {"act_scale": "dynamic", "fused_w_scale": True},
    "static + fused W scale": {"act_scale": "static", "fused_w_scale": True},
    "static + W scale per projection": {"act_scale": "static", "fused_w_scale": False},
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--methods", default="rtn,arhq")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    ap.add_argument("--out", default="benchmarks/results/static_scales.json")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model (bench_tiny)")
    args = ap.parse_args(argv)
    seq_len, chunks, bsz = 512, 16, 2
    if args.tiny:  # RTN, two variants, a few chunks
        from benchmarks import bench_tiny

        m, corpus = bench_tiny.tiny_model(), bench_tiny.tiny_corpus()
        args.calib_tokens, seq_len, chunks = bench_tiny.CALIB_TOKENS, bench_tiny.SEQ_LEN, 2
        if args.methods == "rtn,arhq":
            args.methods = "rtn"
        if args.variants == ",".join(VARIANTS):
            args.variants = "dynamic (today),static + fused W scale"
    else:
        m = load_model("smollm2")
        corpus = load_corpus(m.tokenizer)
    calib = calibration_ids(corpus.calib, args.calib_tokens, seq_len)
    models, rows = {}, []
    for method in args.methods.split(","):
        for vname in args.variants.split(","):
            kw = VARIANTS[vname]
            qcfg = QuantConfig(
                method=method, w_fmt="nvfp4", act_fmt="nvfp4", **takes(method, rank=32), **kw
            )
            t0 = time.perf_counter()
            res = quantize_model(m.params, m.cfg, calib, qcfg, progress=False)
            name = f"{method} | {vname}"
            models[name] = res.params
            rows.append({"model": name, "quantize_s": round(time.perf_counter() - t0, 1)})
            print(f"quantized {name} in {rows[-1]['quantize_s']}s", flush=True)
    scores = evaluate_models(
        models,
        m.params,
        m.cfg,
        corpus.eval,
        seq_len=seq_len,
        max_chunks=chunks,
        batch_size=bsz,
        progress=False,
    )
    for r in rows:
        r.update(scores[r["model"]])
    batch = {}
    for name in [n for n in models if n.startswith("rtn")]:
        for bs in (1, 4):
            s = evaluate_models(
                {"q": models[name]},
                m.params,
                m.cfg,
                corpus.eval,
                seq_len=seq_len // 2,
                max_chunks=max(1, chunks // 4),
                batch_size=bs,
                progress=False,
            )
            batch[f"{name} | batch {bs}"] = s["q"]["ppl"]
    out = {
        "calib_tokens": int(calib.size),
        "float_ppl": scores["float"]["ppl"],
        "eval": "pydoc[60%:], seq_len 512, 16 chunks, batch 2",
        "rows": rows,
        "batch_dependence": {"eval": "seq_len 256, 4 chunks", "ppl": batch},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"float ppl {out['float_ppl']:.4f}; {calib.size} calibration tokens")
    for r in rows:
        print(f"{r['model']:42s} ppl {r['ppl']:.4f}  KL {r['kl']:.5f}  top-1 {r['top1']:.4f}")
    for k, v in batch.items():
        print(f"{k:52s} ppl {v:.4f}")


if __name__ == "__main__":
    main()
