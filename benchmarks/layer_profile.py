"""Where one layer's calibration and decomposition time goes: each piece timed on its own.

    .venv/bin/python benchmarks/layer_profile.py            # SmolLM2 layer 3, batch 8 x 512 tokens
    .venv/bin/python benchmarks/layer_profile.py --tiny     # a smoke run on a tiny random layer

Pieces (each jit-compiled once, then the best of ``--reps`` runs with ``jax.block_until_ready``):
the calibration's layer pass (``calibrate.layer_pass``: forward + captures) with the attention
over the full masked square and over causal blocks (``transformer.CAUSAL_BLOCK``), the attention
alone both ways, each linear, and per input group the G update (``stats.update_stats``) with its
two parts, E = x − Q_a(x) and the block-triangular Gram (``stats.sym_gram``); then the
decomposition's pieces: ``factor_g`` per G and the ARHQ split per projection. Each line gives the
milliseconds, the FLOPs the piece needs and the GFLOP/s that makes, against the f32 matmul peak
measured in the same run. On a shared machine compare the lines of one run with each other.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see arhq_jax/cli/main.py

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The repository root, never benchmarks/ itself, on sys.path (its modules would shadow packages).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))


def best_ms(fn, reps: int) -> float:
    """Best of ``reps`` timed calls of ``fn`` (after one untimed call: the compilation)."""
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random layer")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from arhq_jax.calibration import stats
    from arhq_jax.decomposition import decompose
    from arhq_jax.methods.lowrank import stats_config
    from arhq_jax.models import transformer
    from arhq_jax.models.config import GROUP_OF, INPUT_GROUPS
    from arhq_jax.run.config import QuantConfig

    if args.tiny:
        from arhq_jax.models.params import random_params
        from benchmarks.bench_tiny import CFG as cfg

        layer = random_params(cfg, jax.random.key(0), std=0.1).layers[0]
        b, t, reps, rank, peak_n = 2, 64, 1, 4, 256
    else:
        from converters import load_model

        m = load_model(args.model)
        cfg, layer = m.cfg, m.params.layers[args.layer]
        b, t, reps, rank, peak_n = args.batch, args.seq_len, args.reps, args.rank, 2048
    n = b * t
    hi = jax.lax.Precision.HIGHEST
    a = jax.random.normal(jax.random.PRNGKey(0), (peak_n, peak_n), jnp.float32)
    mm = jax.jit(lambda x: jnp.matmul(x, x, precision=hi))
    peak = 2 * peak_n**3 / best_ms(lambda: mm(a), reps) / 1e6
    print(f"{cfg.family}, {n} tokens ({b} x {t}); f32 matmul peak {peak:.0f} GFLOP/s")

    def line(name, ms, flop=None):
        rate = "" if not flop else f"  {flop / 1e9:7.2f} GFLOP  {flop / ms / 1e6:5.0f} GFLOP/s"
        print(f"  {name:34} {ms:8.1f} ms{rate}")

    h = jax.random.normal(jax.random.PRNGKey(1), (b, t, cfg.hidden_size), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    shapes = cfg.linear_shapes()
    lin_flop = 2 * n * sum(o * i for o, i in shapes.values())
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    square = 4 * b * t * t * nh * d  # QKᵀ and PV over the full square
    print("calibration, one layer and batch:")
    for blk in (0, transformer.CAUSAL_BLOCK):
        fwd = jax.jit(
            functools.partial(transformer.layer_forward, capture=True, causal_block=blk),
            static_argnums=1,
        )
        ms = best_ms(lambda fwd=fwd: fwd(layer, cfg, h, pos), reps)
        line(f"layer pass, causal block {blk}", ms, lin_flop + square)
    _, _, cap = transformer.layer_forward(layer, cfg, h, pos, capture=True)
    q = jax.random.normal(jax.random.PRNGKey(2), (b, t, nh, d), jnp.float32)
    kv = jax.random.normal(jax.random.PRNGKey(3), (b, t, nkv, d), jnp.float32)
    bias = transformer.attention_bias(jnp.ones((b, t), bool), t, 0, jnp.float32)
    for blk in (0, transformer.CAUSAL_BLOCK):
        att = jax.jit(functools.partial(transformer.attention, scale=d**-0.5, causal_block=blk))
        ms = best_ms(lambda att=att: att(q, kv, kv, bias), reps)
        line(f"  attention, causal block {blk}", ms, square)
    x_in = {p: cap[GROUP_OF[p]].reshape(n, -1) for p in shapes}
    run_linear = jax.jit(lambda lin, x: lin(x))
    for p, (o, i) in shapes.items():
        ms = best_ms(lambda p=p: run_linear(getattr(layer, p), x_in[p]), reps)
        line(f"  {p} [{o}, {i}]", ms, 2 * n * o * i)
    qcfg = QuantConfig(method="arhq", rank=rank, w_fmt="nvfp4-paper", act_fmt="nvfp4-paper")
    spec = stats_config(qcfg, g=True, absmax=False)
    mask = jnp.ones((b, t), bool)
    err = jax.jit(lambda x: x - stats.fake_quant(x, spec.act_fmt))
    gram = jax.jit(stats.sym_gram)
    for g, x in cap.items():
        dim = x.shape[-1]
        st = stats.init_stats(dim, spec)
        ms = best_ms(lambda st=st, x=x: stats.update_stats(st, x, spec, mask=mask), reps)
        line(f"G update {g} [{dim}]", ms, 2 * n * dim * dim)
        e = x.reshape(n, dim)
        line("  E = x - Q_a(x)", best_ms(lambda e=e: err(e), reps))
        line("  sym_gram(E)", best_ms(lambda e=e: gram(e), reps), 2 * n * dim * dim)
    print("decomposition, one layer:")
    gs = {}
    for g, x in cap.items():
        st = stats.update_stats(stats.init_stats(x.shape[-1], spec), x, spec, mask=mask)
        gs[g] = stats.finalize(st)["G"]
        root = any(shapes[p][0] > shapes[p][1] for p in INPUT_GROUPS[g])
        fac = lambda g=g, root=root: decompose.factor_g(gs[g], qcfg.eps, root=root)  # noqa: E731
        line(f"factor_g {g} (root {root})", best_ms(fac, reps))
    for p in shapes:
        w = getattr(layer, p).w.astype(jnp.float32)
        fac = decompose.factor_g(gs[GROUP_OF[p]], qcfg.eps, root=w.shape[0] > w.shape[1])
        line(f"arhq split {p}", best_ms(lambda w=w, fac=fac: decompose.arhq(w, fac, rank), reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
