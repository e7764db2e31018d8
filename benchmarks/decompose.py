"""Time ``arhq_jax.decomposition.decompose.arhq`` against a numpy float64 implementation of the
same steps.

Shapes are the projections of SmolLM2-135M (576×576, 1536×576, 576×1536) and Qwen3-4B
(4096×2560, 9728×2560, 2560×9728 with a 9728×9728 G); G is [in, in]. W is random normal and G a
random PSD matrix with a realistic spectrum (diagonal-dominant with log-normal channel
energies, louder outlier blocks of 16, a weak correlated part, and a few dead channels that the ε
clamp has to catch).

    .venv/bin/python benchmarks/decompose.py            # everything (the 9728 case takes minutes)
    .venv/bin/python benchmarks/decompose.py --quick    # SmolLM2 shapes only

Timings of the JAX path are of the public ``arhq`` call; for shapes that run in under a few
seconds a warm-up call is made first (so compile time is excluded), for larger ones the single
timed call includes compilation (about a second, marked ``*``).
"""  # noqa: E501

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from arhq_jax.decomposition.decompose import arhq  # noqa: E402

SMOL = [(576, 576), (1536, 576), (576, 1536)]
QWEN = [(4096, 2560), (9728, 2560), (2560, 9728)]


def random_problem(out: int, d: int, seed: int = 0):
    """W [out, d] f64 and a PSD G [d, d] f64 shaped like an activation-residual Hessian.

    E = X − Q_a(X) is nearly independent across elements, with a magnitude set by its 16-wide
    block's scale: G is diagonal-dominant, with log-normal channel energies, a shared factor per
    block, a few outlier blocks ~100× louder, a weak correlated low-rank part, and dead channels.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, d)) * 0.02
    block = np.exp(rng.normal(0.0, 1.0, size=-(-d // 16)))
    block[rng.choice(block.size, size=max(1, block.size // 50), replace=False)] *= 100.0
    diag = np.exp(rng.normal(np.log(1e-3), 0.7, size=d)) * np.repeat(block, 16)[:d]
    diag[rng.choice(d, size=max(1, d // 500), replace=False)] = 0.0  # dead channels
    k = 16
    c = rng.standard_normal((d, k)) * np.sqrt(diag)[:, None] * 0.3
    g = c @ c.T + np.diag(diag)
    return w, 0.5 * (g + g.T)


def numpy_arhq(w, g, rank, eps=1e-6):
    """The docs/spec/methods.md §2.2 steps in numpy float64."""
    g = 0.5 * (g + g.T)
    lam, u = np.linalg.eigh(g)
    root = np.sqrt(np.maximum(lam, eps))
    g_half = (u * root) @ u.T
    g_inv_half = (u / root) @ u.T
    um, s, vt = np.linalg.svd(w @ g_half, full_matrices=False)
    b = um[:, :rank] * s[:rank]
    a = g_inv_half @ vt[:rank].T
    residual = w - b @ a.T
    return residual, float(np.sum(s[rank:] ** 2))


def _timed(fn, repeats: int = 1):
    """``(result, best seconds of repeats)``: the minimum is the least noisy on a shared CPU."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def run_case(out, d, rank, dtype, w64, g64, warm: bool, repeats: int):
    cast = np.float32 if dtype == "f32" else np.float64

    def call():
        split = arhq(w64.astype(cast), g64.astype(cast), rank)
        jax.block_until_ready(split)
        return split

    with jax.enable_x64(dtype == "f64"):
        if warm:
            call()
        split, secs = _timed(call, repeats if warm else 1)
        obj = float(split.objective)
        res = np.asarray(split.residual, np.float64)
    return secs, obj, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="best of N for the small shapes")
    ap.add_argument("--tiny", action="store_true", help="smoke run: one 96x64 problem, rank 4")
    args = ap.parse_args(argv)
    shapes = [("SmolLM2-135M", s) for s in SMOL]
    if args.tiny:
        shapes, args.rank, args.repeats = [("tiny", (96, 64))], 4, 1
    elif not args.quick:
        shapes += [("Qwen3-4B", s) for s in QWEN]

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, rank {args.rank}",
        flush=True,
    )
    rows = []
    for model, (out, d) in shapes:
        w, g = random_problem(out, d)
        print(f"[{model} {out}x{d}, G {d}x{d}] numpy f64 ...", end=" ", flush=True)
        (res_np, obj_np), t_np = _timed(lambda w=w, g=g: numpy_arhq(w, g, args.rank))
        warm = t_np < 5.0
        if warm and args.repeats > 1:
            _, t_np = _timed(lambda w=w, g=g: numpy_arhq(w, g, args.rank), args.repeats)
        print(f"{t_np:.2f}s", flush=True)
        for dtype in ("f32", "f64"):
            print(f"[{model} {out}x{d}] jax {dtype} ...", end=" ", flush=True)
            t_jx, obj, res = run_case(out, d, args.rank, dtype, w, g, warm, args.repeats)
            print(f"{t_jx:.2f}s", flush=True)
            rel_obj = abs(obj - obj_np) / max(abs(obj_np), 1e-300)
            rel_res = np.linalg.norm(res - res_np) / np.linalg.norm(w)
            rows.append((model, f"{out}x{d}", dtype, t_jx, warm, t_np, rel_obj, rel_res))

    print()
    hdr = f"{'model':<13} {'W [out x in]':<12} {'jax':<4} {'jax s':>9} {'numpy f64 s':>12} "
    hdr += f"{'jax/numpy':>9} {'rel obj diff':>13} {'rel res diff':>13}"
    print(hdr)
    print("-" * len(hdr))
    for model, shape, dtype, t_jx, warm, t_np, rel_obj, rel_res in rows:
        mark = " " if warm else "*"
        print(
            f"{model:<13} {shape:<12} {dtype:<4} {t_jx:>8.2f}{mark} {t_np:>12.2f} "
            f"{t_jx / t_np:>9.2f} {rel_obj:>13.2e} {rel_res:>13.2e}"
        )
    print(
        f"* one call, includes compilation; other rows: best of {args.repeats} after a warm-up. "
        "rel res diff = ‖res_jax − res_np‖/‖W‖."
    )


if __name__ == "__main__":
    main()
