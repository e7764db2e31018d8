"""Pipeline timings on SmolLM2-135M, from one run.

1. Quantize (ARHQ by default, NVFP4 W4A4, rank 32): seconds in calibration (forward passes and
   statistics), decomposition (eigh/SVD) and packing (quantize + wrap), and the checkpoint size.
2. Evaluation throughput (tokens/s, jit-compiled, warm) of three forwards of the same model on
   the same chunks: the unquantized model, the fake-quant model (residual held dequantized in
   f32) and the packed model (4-bit codes + scales, dequantized inside the forward).

    .venv/bin/python benchmarks/throughput.py [--method arhq] [--calib-tokens 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from arhq_jax.checkpoint.store import tree_nbytes  # noqa: E402
from arhq_jax.evaluation.metrics import make_chunks  # noqa: E402
from arhq_jax.evaluation.pipeline import calibration_ids, load_corpus  # noqa: E402
from arhq_jax.linears.quantized import dequantized  # noqa: E402
from arhq_jax.models import transformer  # noqa: E402
from arhq_jax.run.config import QuantConfig, takes  # noqa: E402
from arhq_jax.run.quantize import quantize_model  # noqa: E402
from converters import load_model  # noqa: E402


def tokens_per_second(params, cfg, batches, repeats: int) -> float:
    fwd = jax.jit(transformer.forward, static_argnums=(1,))
    jax.block_until_ready(fwd(params, cfg, batches[0]))  # compile + warm-up
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for ids in batches:
            jax.block_until_ready(fwd(params, cfg, ids))
            n += ids.size
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="arhq")
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model (bench_tiny)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.tiny:
        from benchmarks import bench_tiny

        m, corpus = bench_tiny.tiny_model(), bench_tiny.tiny_corpus()
        args.calib_tokens, args.seq_len, args.chunks, args.repeats = 256, 32, 2, 1
    else:
        m = load_model(args.model)
        corpus = load_corpus(m.tokenizer)
    load_s = time.perf_counter() - t0
    calib = calibration_ids(corpus.calib, args.calib_tokens, args.seq_len)
    qcfg = QuantConfig(
        method=args.method,
        w_fmt=args.format,
        act_fmt=args.format,
        **takes(args.method, rank=args.rank),
    )
    t0 = time.perf_counter()
    res = quantize_model(m.params, m.cfg, calib, qcfg, progress=not args.tiny)
    total = time.perf_counter() - t0
    t = res.timings
    print(
        f"\nquantize {qcfg.label()} on {res.calib_tokens} tokens ({jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)); model load {load_s:.1f}s"
    )
    for k in ("calibration_s", "decomposition_s", "packing_s"):
        print(f"  {k[:-2]:<14} {t[k]:8.1f} s  ({t[k] / total:5.1%})")
    print(f"  {'total':<14} {total:8.1f} s")
    print(
        f"  size: {tree_nbytes(res.params) / 2**20:.1f} MiB packed vs "
        f"{tree_nbytes(m.params) / 2**20:.1f} MiB unquantized ({m.cfg.param_dtype})"
    )

    chunks = make_chunks(corpus.eval, args.seq_len, args.chunks * args.batch)
    batches = [chunks[i : i + args.batch] for i in range(0, len(chunks), args.batch)]
    rows = {
        "unquantized": m.params,
        "fake-quant (f32 residual)": dequantized(res.params),
        "packed (4-bit codes)": res.params,
    }
    print(
        f"\nevaluation forward, batch {args.batch} x {args.seq_len} tokens, "
        f"{len(batches)} batches x {args.repeats} repeats (warm, jit)"
    )
    base = None
    for name, p in rows.items():
        tps = tokens_per_second(p, m.cfg, [np.asarray(b) for b in batches], args.repeats)
        base = base or tps
        print(f"  {name:<28} {tps:9.0f} tokens/s   ratio to unquantized {tps / base:5.2f}")


if __name__ == "__main__":
    main()
