"""Exploration runs for the best W4A4 recipe: quantize SmolLM2 with a few QuantConfigs, one at a
time, and score each (ppl, KL, top-1 on the demo's split: pydoc evaluation part, seq-len 512,
16 chunks).

    .venv/bin/python benchmarks/explore_w4a4.py --out runs/explore.jsonl \
        --run 'arhq r32={"method":"arhq","rank":32}' ...

Appends one JSON line per run (name, config, bits/w, quantize time, ppl, KL, top-1).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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

from arhq_jax.evaluation.pipeline import calibration_ids, evaluate_models, load_corpus  # noqa: E402
from arhq_jax.run.config import QuantConfig  # noqa: E402
from arhq_jax.run.quantize import quantize_model  # noqa: E402
from benchmarks.compare import projection_bits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--max-chunks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="runs/explore.jsonl")
    ap.add_argument("--run", action="append", default=[], help="NAME=JSON kwargs of QuantConfig")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model (bench_tiny)")
    args = ap.parse_args(argv)
    from converters import load_model

    seq_len = 512
    if args.tiny:  # one ARHQ row unless --run is given
        from benchmarks import bench_tiny

        m, corpus = bench_tiny.tiny_model(), bench_tiny.tiny_corpus()
        args.calib_tokens, args.max_chunks = bench_tiny.CALIB_TOKENS, 2
        seq_len = args.seq_len = bench_tiny.SEQ_LEN
        args.run = args.run or ['arhq={"method": "arhq", "rank": 4}']
    else:
        m = load_model("smollm2")
        corpus = load_corpus(m.tokenizer)
    calib = calibration_ids(corpus.calib, args.calib_tokens, seq_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.run:
        name, kw = spec.split("=", 1)
        kw = {"factor_dtype": "bfloat16", **json.loads(kw)}
        qcfg = QuantConfig(**kw)
        t0 = time.perf_counter()
        res = quantize_model(m.params, m.cfg, calib, qcfg, progress=False)
        qs = time.perf_counter() - t0
        sc = evaluate_models(
            {name: res.params},
            m.params,
            m.cfg,
            corpus.eval,
            seq_len=args.seq_len,
            max_chunks=args.max_chunks,
            progress=False,
        )
        row = {
            "name": name,
            "calib_tokens": int(calib.size),
            "bits": projection_bits(res.params, m.cfg),
            "quant_s": round(qs, 1),
            "timings": {k: round(v, 1) for k, v in res.timings.items()},
            "float_ppl": sc["float"]["ppl"],
            **{k: sc[name][k] for k in ("ppl", "kl", "top1")},
            "config": kw,
        }
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
