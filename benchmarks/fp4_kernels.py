"""Benchmark the fused FP4 + low-rank Pallas kernel (docs/spec/kernels.md §10).

For the projections of SmolLM2-135M, Llama-3-8B and Qwen3-4B and M in {1, 16, 128, 2048, 8192} it
times the Pallas kernel against (a) the unfused XLA path (dequantize + dot + low-rank in one jit),
(b) a bf16 ``jnp.dot`` on unquantized weights and (c) ``jax.nn.scaled_matmul`` where the jax
version and the GPU support it, and reports achieved GB/s and TFLOP/s and the ratio to the copy
bandwidth and bf16 matmul rate measured in the same run. Results go to
``benchmarks/results/<device>.json`` and a PNG plot next to it.

    .venv/bin/python benchmarks/fp4_kernels.py                    # GPU: everything
    .venv/bin/python benchmarks/fp4_kernels.py --models llama3-8b --ms 1,16 --formats nvfp4
    .venv/bin/python benchmarks/fp4_kernels.py --quick            # GPU: a few shapes

On a machine without a GPU the kernels run in Pallas interpret mode on small shapes, for
correctness only: the script says so, reports the error against the jnp path and no timings.

Timing: every variant is jitted and warmed up; one timed call runs the variant on ``copies``
distinct weight copies (together well over the 50 MB L2 for large layers; all outputs are
returned, so nothing is elided), and the median of ``--reps`` calls divided by the number of
copies is reported. Launch overhead is included, so the ~µs SmolLM2 layers measure it mostly.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arhq_jax import formats  # noqa: E402
from arhq_jax.atomic import atomic_file  # noqa: E402
from arhq_jax.models.config import ModelConfig  # noqa: E402
from arhq_jax.qlinear import quant_matmul_ref, smooth_input  # noqa: E402
from pallas_kernels.fp4_matmul import choose_tiles, fp4_lowrank_matmul  # noqa: E402

MODELS = {
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
    ),
    "llama3-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=5e5,
    ),
    "qwen3-4b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1e6,
    ),
}  # fmt: skip
MS = (1, 16, 128, 2048, 8192)
BITS = {"nvfp4": 4.5, "mxfp4": 4.25}
CPU_SHAPES = [(192, 576, "smollm2-135m", "k_proj"), (200, 320, "odd", "odd")]
CPU_MS = (1, 7, 128)
L2_BYTES = 50e6

# Autotuning candidates (bm, bn, bk, num_warps, num_stages) per M class (docs/spec/kernels.md §8).
TUNE = {
    "decode": [(16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (16, 32, 128, 4, 4)],
    "mid": [(64, 64, 128, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)],
    "prefill": [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
                (64, 128, 128, 4, 4)],
}  # fmt: skip


def device_name() -> str:
    d = jax.devices()[0]
    name = getattr(d, "device_kind", d.platform)
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or d.platform


def projection_shapes(models) -> list[tuple[int, int, str, str]]:
    """Distinct (N, K) per model with the projection names that have it."""
    out = []
    for model in models:
        seen = {}
        for proj, (n, k) in MODELS[model].linear_shapes().items():
            seen.setdefault((n, k), []).append(proj)
        out += [(n, k, model, "/".join(p)) for (n, k), p in seen.items()]
    return out


def time_call(fn, *args, reps: int) -> float:
    """Median wall time (s) of ``fn(*args)`` after a warm-up, blocking on the outputs."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_limits(reps: int) -> dict:
    """Copy bandwidth (x + 1 over 2 GiB: read + write) and an 8192³ bf16 matmul, in this run."""
    x = jnp.ones((2**29,), jnp.float32)
    t = time_call(jax.jit(lambda x: x + 1), x, reps=reps)
    bw = 2 * x.nbytes / t
    del x
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    b = jnp.ones((8192, 8192), jnp.bfloat16)
    t = time_call(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)), a, b,
                  reps=reps)  # fmt: skip
    return {"copy_GBps": bw / 1e9, "bf16_TFLOPs": 2 * 8192**3 / t / 1e12}


def make_layer(n, k, r, fmt, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32)
    q = formats.quantize(w, fmt)
    a = jnp.asarray(rng.standard_normal((k, r)) * 0.02, jnp.bfloat16) if r else None
    b = jnp.asarray(rng.standard_normal((n, r)) * 0.02, jnp.bfloat16) if r else None
    s = jnp.asarray(np.exp(rng.standard_normal(k) * 0.3), jnp.float32)
    return w.astype(jnp.bfloat16), q, a, b, s


def compulsory_bytes(m, n, k, r, fmt, act) -> float:
    """docs/spec/kernels.md §10: weights, factors, s, g, x, y and the intermediates of the 2-kernel
    path."""
    b = n * k * BITS[fmt] / 8 + r * (k + n) * 2 + k * 4 + 4 + m * k * 2 + m * n * 2
    b += 8 * m * r  # t written and read
    if act is not None:
        b += 4 * m * k  # the bf16 activation operand written and read
    return b


def scaled_matmul_fn(act_fmt):
    """(c): XLA activation quantization + ``jax.nn.scaled_matmul`` (nvfp4 E2M1/E4M3 per 16) +
    the low-rank branch in XLA. Weights are pre-expanded to float4 offline (not timed)."""
    if not hasattr(jax.nn, "scaled_matmul") or act_fmt != "nvfp4":
        return None

    def f4(q):
        nib = formats.unpack_nibbles(q.codes).astype(jnp.uint4)
        return jax.lax.bitcast_convert_type(nib, jnp.float4_e2m1fn)

    def fn(x, w4, ws, gw, a, b, s):
        xs = x.astype(jnp.float32) * (1.0 / s)
        qx = formats.quantize(xs, "nvfp4")
        y = jax.nn.scaled_matmul(f4(qx)[None], w4[None], qx.scales[None], ws[None])[0]
        # The tensor parts of the decodes (fl(1/gs) for nvfp4, g for nvfp4-modelopt).
        y = y * (formats.nvfp4_decode_scale(qx.tensor_scale) * gw)
        if a is not None:
            y = y + (xs @ a.astype(jnp.float32)) @ b.astype(jnp.float32).T
        return y.astype(x.dtype)

    return fn, f4


def bench_gpu(args, limits: dict) -> dict:
    results, tuned = [], {}
    for n, k, model, proj in projection_shapes(args.models):
        for fmt in args.formats:
            for act in args.acts:
                r = args.rank
                w16, q, a, b, s = make_layer(n, k, r, fmt)
                wbytes = q.codes.nbytes + q.scales.nbytes
                copies = max(1, min(8, math.ceil(3 * L2_BYTES / (n * k * 2))))
                # Distinct buffers, so that repeated calls do not hit a weight resident in L2.
                qs = [jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), q)
                      for _ in range(copies)]  # fmt: skip
                w16s = [jnp.array(w16, copy=True) for _ in range(copies)]
                for m in args.ms:
                    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
                    row = dict(model=model, proj=proj, N=n, K=k, M=m, fmt=fmt, act=act or "none",
                               rank=r, copies=copies, weight_MB=wbytes / 1e6)  # fmt: skip
                    row.update(run_variants(x, qs, w16s, a, b, s, fmt, act, tuned, args))
                    byts = compulsory_bytes(m, n, k, r, fmt, act)
                    flops = 2 * m * n * k + 2 * m * r * (k + n)
                    t = row["t_us"]["pallas"] * 1e-6
                    row.update(
                        bytes=byts, flops=flops, GBps=byts / t / 1e9, TFLOPs=flops / t / 1e12,
                        frac_mem_limit=byts / t / 1e9 / limits["copy_GBps"],
                        frac_compute_limit=flops / t / 1e12 / limits["bf16_TFLOPs"],
                        roofline_us=1e6 * max(byts / (limits["copy_GBps"] * 1e9),
                                              flops / (limits["bf16_TFLOPs"] * 1e12)),
                    )  # fmt: skip
                    row["frac_roofline"] = row["roofline_us"] / row["t_us"]["pallas"]
                    for v in ("xla_unfused", "bf16_dot", "scaled_matmul"):
                        tv = row["t_us"].get(v)
                        row[f"speedup_vs_{v}"] = None if tv is None else tv / row["t_us"]["pallas"]
                    results.append(row)
                    print(format_row(row))
    return {"results": results}


def run_variants(x, qs, w16s, a, b, s, fmt, act, tuned, args) -> dict:
    m, k = x.shape
    n = qs[0].shape[0]
    cls = "decode" if m <= 16 else "mid" if m <= 128 else "prefill"
    key = (cls, n, k, act)
    if key not in tuned:
        cands = [c for c in TUNE[cls] if n % c[1] == 0 and k % c[2] == 0] if args.tune else []
        cands = cands or [choose_tiles(m, n, k)]
        best = None
        for c in cands:
            fn = kernel_fn(act, c, len(qs))
            try:
                t = time_call(fn, x, qs, a, b, s, reps=max(3, args.reps // 4))
            except Exception as e:  # a config that fails to compile is skipped
                print(f"  tile {c} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            if best is None or t < best[0]:
                best = (t, c)
        tuned[key] = best[1]
    tiles = tuned[key]
    out = {"tiles": dict(zip(("bm", "bn", "bk", "num_warps", "num_stages"), tiles, strict=True))}
    times = {}
    times["pallas"] = time_call(kernel_fn(act, tiles, len(qs)), x, qs, a, b, s, reps=args.reps)
    ref = jax.jit(lambda x, qs, a, b, s: tuple(
        quant_matmul_ref(x, q, a, b, s, act) for q in qs))  # fmt: skip
    times["xla_unfused"] = time_call(ref, x, qs, a, b, s, reps=args.reps)
    dense = jax.jit(lambda x, ws: tuple(jnp.dot(x, w.T) for w in ws))
    times["bf16_dot"] = time_call(dense, x, w16s, reps=args.reps)
    sm = scaled_matmul_fn(act) if fmt == "nvfp4" else None
    if sm is not None:
        fn, f4 = sm
        w4s = [f4(q) for q in qs]
        try:
            f = jax.jit(lambda x, w4s, qs, a, b, s: tuple(
                fn(x, w4, q.scales, formats.nvfp4_decode_scale(q.tensor_scale, q.spec), a, b, s)
                for w4, q in zip(w4s, qs, strict=True)
            ))  # fmt: skip
            times["scaled_matmul"] = time_call(f, x, w4s, qs, a, b, s, reps=args.reps)
        except Exception as e:
            out["scaled_matmul_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    out["t_us"] = {v: 1e6 * t / len(qs) for v, t in times.items()}
    y = kernel_fn(act, tiles, 1)(x, qs[:1], a, b, s)[0]
    y_ref = quant_matmul_ref(x, qs[0], a, b, s, act)
    out["max_rel_err_vs_jnp"] = rel_err(y, y_ref)
    if m <= 2048:
        out["max_rel_err_vs_f64"] = rel_err(y, f64_reference(x, qs[0], a, b, s, act))
    return out


def kernel_fn(act, tiles, n_copies, interpret=False):
    bm, bn, bk, nw, ns = tiles
    f = functools.partial(
        fp4_lowrank_matmul, act_fmt=act, interpret=interpret, block_m=bm, block_n=bn,
        block_k=bk, num_warps=nw, num_stages=ns,
    )  # fmt: skip
    return jax.jit(lambda x, qs, a, b, s: tuple(f(x, q, a, b, s) for q in qs[:n_copies]))


def f64_reference(x, q, a, b, s, act) -> np.ndarray:
    """The same quantized operands (bit-identical to the kernel's) summed exactly, in float64."""
    xs = smooth_input(x, s)
    xq = xs if act is None else formats.fake_quant(xs, act)
    w = np.asarray(formats.dequantize(q, jnp.float32), np.float64)
    y = np.asarray(xq, np.float64) @ w.T
    if a is not None:
        a64 = np.asarray(a.astype(jnp.float32), np.float64)
        b64 = np.asarray(b.astype(jnp.float32), np.float64)
        y = y + (np.asarray(xs, np.float64) @ a64) @ b64.T
    return y


def rel_err(y, y_ref) -> float:
    y = np.asarray(y, np.float64)
    y_ref = np.asarray(y_ref, np.float64)
    return float(np.max(np.abs(y - y_ref)) / max(np.max(np.abs(y_ref)), 1e-30))


def format_row(row) -> str:
    t = row["t_us"]
    sp = " ".join(
        f"{v}={row[f'speedup_vs_{v}']:.2f}x" for v in ("xla_unfused", "bf16_dot", "scaled_matmul")
        if row.get(f"speedup_vs_{v}") is not None
    )  # fmt: skip
    return (
        f"{row['model']:>13} {row['N']:>5}x{row['K']:<5} M={row['M']:<5} {row['fmt']}/"
        f"{row['act']:<5} r={row['rank']} pallas {t['pallas']:9.1f} us  {row['GBps']:7.0f} GB/s "
        f"({row['frac_mem_limit']:.0%} mem)  {row['TFLOPs']:6.1f} TFLOP/s "
        f"({row['frac_compute_limit']:.0%} mm)  roofline {row['frac_roofline']:.0%}  {sp}"
    )


def bench_cpu(args) -> dict:
    """Interpret mode on small shapes: correctness only (no timings: interpret mode is a scan)."""
    results = []
    for n, k, model, proj in CPU_SHAPES:
        for fmt in args.formats:
            for act in args.acts:
                w16, q, a, b, s = make_layer(n, k, args.rank, fmt)
                for m in CPU_MS:
                    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.float32)
                    tiles = choose_tiles(m, n, q.codes.shape[1] * 2)
                    y = kernel_fn(act, tiles, 1, interpret=True)(x, [q], a, b, s)[0]
                    err = rel_err(y, quant_matmul_ref(x, q, a, b, s, act))
                    err64 = rel_err(y, f64_reference(x, q, a, b, s, act))
                    # Only the f32 summation order may differ: within 1e-6 of the jnp path, or
                    # of the exact sum (XLA:CPU's own f32 dot is ~1e-6 off it at K = 576).
                    row = dict(model=model, proj=proj, N=n, K=k, M=m, fmt=fmt, act=act or "none",
                               rank=args.rank, tiles=list(tiles), max_rel_err_vs_jnp=err,
                               max_rel_err_vs_f64=err64, ok=min(err, err64) <= 1e-6)  # fmt: skip
                    results.append(row)
                    print(f"  {n:>4}x{k:<4} M={m:<4} {fmt}/{act or 'none':<5} r={args.rank} "
                          f"tiles={tiles[:3]}  max rel err vs jnp path {err:.1e}, vs exact f64 "
                          f"sum {err64:.1e}  {'ok' if row['ok'] else 'FAIL'}")  # fmt: skip
    return {"results": results}


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    if data["mode"] != "gpu-timing":
        fig, ax = plt.subplots(figsize=(8, 3.5))
        labels = [f"{r['N']}x{r['K']} M{r['M']} {r['fmt']}/{r['act']}" for r in rows]
        pos = np.arange(len(rows))
        ax.bar(pos - 0.2, [max(r["max_rel_err_vs_jnp"], 1e-12) for r in rows], 0.4,
               label="vs jnp path")  # fmt: skip
        ax.bar(pos + 0.2, [max(r["max_rel_err_vs_f64"], 1e-12) for r in rows], 0.4,
               label="vs exact f64 sum")  # fmt: skip
        ax.axhline(1e-6, color="r", ls="--", label="tolerance 1e-6")
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_title("interpret mode (CPU): max relative error, correctness only")
        ax.legend()
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        groups = {}
        for r in rows:
            groups.setdefault((r["model"], r["N"], r["K"], r["fmt"], r["act"]), []).append(r)
        for (model, n, k, fmt, act), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["M"])
            ms = [r["M"] for r in rs]
            lab = f"{model} {n}x{k} {fmt}/{act}"
            axes[0].plot(ms, [r["frac_roofline"] for r in rs], marker="o", label=lab)
            axes[1].plot(ms, [r["speedup_vs_xla_unfused"] for r in rs], marker="o", label=lab)
        for ax, t in zip(axes, ("fraction of roofline (measured limits)",
                                "speed-up over unfused XLA"), strict=True):  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("M (tokens)")
            ax.set_title(t)
            ax.grid(alpha=0.3)
        axes[1].axhline(1.0, color="k", lw=0.8)
        axes[1].legend(fontsize=5, ncol=2)
        fig.suptitle(f"{data['device']}  jax {data['jax']}")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _atomic_write(path: str, write, binary: bool = False) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb" if binary else "w") as f:
        write(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--formats", default="nvfp4,mxfp4")
    p.add_argument("--acts", default="w4a4,w4a16", help="w4a4 (act = weight format) and/or w4a16")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-tune", dest="tune", action="store_false")
    p.add_argument("--quick", action="store_true", help="GPU: SmolLM2 + Llama 4096x4096 only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    args.ms = [int(v) for v in args.ms.split(",")]
    args.formats = [f for f in args.formats.split(",") if f]
    for f in args.formats:
        if f not in BITS:
            raise ValueError(f"unknown format {f!r}; the kernel supports {', '.join(BITS)}")
    modes = [a for a in args.acts.split(",") if a]
    if set(modes) - {"w4a4", "w4a16"}:
        raise ValueError(f"--acts takes w4a4 and/or w4a16, got {args.acts!r}")
    args.acts = modes  # resolved per format below

    gpu = jax.default_backend() == "gpu"
    data = {
        "device": str(getattr(jax.devices()[0], "device_kind", "cpu")),
        "jax": jax.__version__,
        "jaxlib": __import__("jaxlib").__version__,
        "backend": "pallas-triton" if gpu else "pallas-interpret (CPU)",
        "mode": "gpu-timing" if gpu else "cpu-interpret-correctness-only",
        "rank": args.rank,
    }
    limits = None
    if not gpu:
        print(
            "No GPU: running the Pallas kernels in INTERPRET mode on small shapes, for "
            "CORRECTNESS ONLY. No timings, bandwidth or roofline figures are measured on CPU."
        )
    if gpu:
        limits = measure_limits(args.reps)
        print(f"device limits (this run): copy {limits['copy_GBps']:.0f} GB/s, "
              f"bf16 matmul {limits['bf16_TFLOPs']:.0f} TFLOP/s")  # fmt: skip
    out = {"limits": limits}
    for fmt in args.formats:
        sub = argparse.Namespace(**vars(args))
        sub.formats = [fmt]
        sub.acts = [fmt if a == "w4a4" else None for a in modes]
        if gpu and args.quick:
            sub.models = ["smollm2-135m", "llama3-8b"]
        res = bench_gpu(sub, limits) if gpu else bench_cpu(sub)
        out.setdefault("results", []).extend(res["results"])
    data.update(out)
    name = device_name() if gpu else "cpu"
    path = os.path.join(args.out, f"{name}.json")
    _atomic_write(path, lambda f: json.dump(data, f, indent=1))
    plot(data, os.path.join(args.out, f"{name}.png"))
    print(f"wrote {path} and {name}.png")
    if not gpu:
        bad = [r for r in data["results"] if not r["ok"]]
        print(f"{len(data['results']) - len(bad)}/{len(data['results'])} interpret-mode cases "
              "within 1e-6 (correctness only, no timings on CPU)")  # fmt: skip
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
