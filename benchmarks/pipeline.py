"""arhq-jax's quantize beside a compact torch implementation of the same work, in one process.

    .venv/bin/python benchmarks/pipeline.py                  # SmolLM2, ARHQ r32 W4A4, 16,384 tokens
    .venv/bin/python benchmarks/pipeline.py --calib-tokens 4096 --layers 4

Both calibrate on the same tokens (the pydoc calibration part, sequences of 512): arhq-jax runs
``quantize_model`` (compilation included, as the CLI does), the torch side
``benchmarks/torch_reference.py`` (hooks + per-linear eigh/SVD). Printed: both times per phase,
the ratio torch / arhq-jax, the f32 matmul peak of jnp and torch measured in the same run, and the
fraction of it the calibration reaches (model FLOPs: the linears' and attention's forward plus
the G updates each side computes). ``uptime`` before and after: on a shared machine the ratio is
the figure, not the seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see arhq_jax/cli/main.py

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    """Best-of-``reps`` GFLOP/s of an ``n × n`` f32 matmul in jnp (HIGHEST) and torch."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    ta = torch.randn(n, n)
    out = {}
    for name, fn in (("jnp", lambda: f(a).block_until_ready()), ("torch", lambda: ta @ ta)):
        fn()
        best = min(_timed(fn) for _ in range(reps))
        out[name] = 2 * n**3 / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops(cfg, n_tokens: int, seq_len: int, layers: int) -> dict:
    """Model FLOPs of the calibration: forward (linears + attention scores/values) and ΣEᵀE
    (full GEMM count 2·N·D²; arhq-jax one G per input group, torch one per linear)."""
    shapes = cfg.linear_shapes()  # {proj: (out, in)}
    fwd_lin = 2 * n_tokens * sum(o * i for o, i in shapes.values())
    attn = 4 * n_tokens * seq_len * cfg.num_heads * cfg.head_dim  # QKᵀ and PV, full square
    from arhq_jax.models.config import INPUT_GROUPS

    g_groups = sum(2 * n_tokens * shapes[ps[0]][1] ** 2 for ps in INPUT_GROUPS.values())
    g_linear = sum(2 * n_tokens * i**2 for _, i in shapes.values())
    return {
        "forward": layers * (fwd_lin + attn),
        "g_jax": layers * g_groups,
        "g_torch": layers * g_linear,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="first N decoder layers only")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import dataclasses

    from arhq_jax.evaluation.pipeline import calibration_ids, load_corpus
    from arhq_jax.run.config import QuantConfig
    from arhq_jax.run.quantize import quantize_model, summarize
    from converters import load_model

    load_before = uptime()
    m = load_model("smollm2")
    cfg, params = m.cfg, m.params
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
        params = params.replace(layers=params.layers[: args.layers])
    corpus = load_corpus(m.tokenizer)
    ids = calibration_ids(corpus.calib, args.calib_tokens, args.seq_len)
    n_tok = int(ids.size)
    peak = matmul_peak()
    qcfg = QuantConfig(method="arhq", rank=args.rank, w_fmt="nvfp4-paper", act_fmt="nvfp4-paper")

    t0 = time.perf_counter()
    res = quantize_model(params, cfg, ids, qcfg, batch_size=args.batch_size, progress=False)
    jax_wall = time.perf_counter() - t0
    jt = res.timings
    fl = flops(cfg, n_tok, args.seq_len, cfg.num_layers)
    ref_peak = max(peak.values())
    out = {
        "calib_tokens": n_tok,
        "layers": cfg.num_layers,
        "peak_gflops": peak,
        "jax": {**jt, "wall_s": jax_wall},
        "uptime_before": load_before,
    }
    cal_jax = (fl["forward"] + fl["g_jax"]) / jt["calibration_s"] / 1e9
    print(
        f"arhq-jax: calibration {jt['calibration_s']:.1f}s, decomposition "
        f"{jt['decomposition_s']:.1f}s, packing {jt['packing_s']:.1f}s "
        f"(wall {jax_wall:.1f}s) on {n_tok} tokens; calibration {cal_jax:.0f} GFLOP/s "
        f"= {cal_jax / ref_peak:.0%} of peak"
    )
    out["diagnostics"] = summarize(res.projections)
    print(f"arhq-jax diagnostics (means over projections): {out['diagnostics']}")
    if not args.skip_torch:
        import torch_reference

        model = torch_reference.torch_model(cfg, params)
        t0 = time.perf_counter()
        _, tt = torch_reference.quantize(model, ids, rank=args.rank, batch_size=args.batch_size)
        torch_wall = time.perf_counter() - t0
        cal_t = (fl["forward"] + fl["g_torch"]) / tt["calibration_s"] / 1e9
        out["torch"] = {**tt, "wall_s": torch_wall}
        out["ratio"] = torch_wall / jax_wall
        print(
            f"torch:    calibration {tt['calibration_s']:.1f}s, decomposition "
            f"{tt['decomposition_s']:.1f}s (wall {torch_wall:.1f}s); calibration {cal_t:.0f} "
            f"GFLOP/s = {cal_t / ref_peak:.0%} of peak"
        )
        print(f"ratio torch / arhq-jax: {out['ratio']:.2f}x")
    out["uptime_after"] = uptime()
    print(
        f"f32 matmul peak: jnp {peak['jnp']:.0f}, torch {peak['torch']:.0f} GFLOP/s; "
        f"model FLOPs: forward {fl['forward'] / 1e12:.2f} T, G {fl['g_jax'] / 1e12:.2f} T "
        f"(arhq-jax) / {fl['g_torch'] / 1e12:.2f} T (torch)"
    )
    print(f"load before: {load_before}\nload after:  {out['uptime_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
