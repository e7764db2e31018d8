"""arhq-jax's quantize, streamed and in memory, beside a compact torch implementation, in one run.

    .venv/bin/python benchmarks/pipeline.py                 # SmolLM2, ARHQ r32 W4A4, 16,384 tokens
    .venv/bin/python benchmarks/pipeline.py --path stream   # only the path `arhq-jax quantize` runs
    .venv/bin/python benchmarks/pipeline.py --tiny          # a smoke run on a tiny random model

All calibrate on the same tokens (the pydoc calibration part, sequences of 512). ``stream`` is what
``arhq-jax quantize`` runs: ``quantize_stream`` from the lazy source (``open_source``) to a
checkpoint directory, disk to disk; ``memory`` is ``quantize_model`` on the loaded model (nothing
written); the torch side is ``benchmarks/torch_reference.py`` (hooks + per-linear eigh/SVD).
Each path (and torch) runs in a fresh process, compilation included, as in the CLI: one after
the other, or all at the same time with ``--concurrent``, so that on a shared machine each sees
the same load (run one after the other, a change of the others' load between the runs moves the
ratios by up to 2x). Printed per path: the
phase times, the wall time, the CPU seconds of the process (all threads; on a shared machine they
move far less with the load than wall seconds), the ratio torch / arhq-jax of the phases (torch's
calibration + decomposition over arhq-jax's calibration + decomposition + packing), of the wall
times and of the CPU seconds, the fraction of the f32 matmul peak
(jnp and torch, measured in the same run) the calibration reaches (model FLOPs: the linears' and
attention's forward plus the G updates each side computes), and the load times of the model.
``uptime`` before and after: on a shared machine the ratio is the figure, not the seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see arhq_jax/cli/main.py

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The repository root, never benchmarks/ itself, on sys.path (its modules would shadow packages).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))


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
    """Model FLOPs of the calibration: forward (linears + attention scores/values over the full
    square, though both sides skip the causally masked half) and ΣEᵀE (full GEMM count 2·N·D²,
    one G per input group on both sides)."""
    shapes = cfg.linear_shapes()  # {proj: (out, in)}
    fwd_lin = 2 * n_tokens * sum(o * i for o, i in shapes.values())
    attn = 4 * n_tokens * seq_len * cfg.num_heads * cfg.head_dim  # QKᵀ and PV, full square
    from arhq_jax.models.config import INPUT_GROUPS

    g_groups = sum(2 * n_tokens * shapes[ps[0]][1] ** 2 for ps in INPUT_GROUPS.values())
    return {
        "forward": layers * (fwd_lin + attn),
        "g_jax": layers * g_groups,
        "g_torch": layers * g_groups,  # torch_reference shares G within an input group too
    }


def _phases(t: dict) -> float:
    return sum(t.get(k, 0.0) for k in ("calibration_s", "decomposition_s", "packing_s"))


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far, every thread included: on a shared
    machine they move far less with the load than wall seconds do."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _table(out: dict, paths) -> None:
    """Each path's and torch's phases, wall, CPU seconds, cores used, load, calibration's
    fraction of the matmul peak and the ratio torch / path, one row each."""
    cols = ("calib", "decomp", "pack", "phases", "wall", "CPU s", "cores", "load", "%peak", "x")
    print(f"{'':8}" + "".join(f"{c:>9}" for c in cols))
    rows = [(p, out[p]) for p in paths] + ([("torch", out["torch"])] if "torch" in out else [])
    for name, r in rows:
        t = r.get("timings", r)
        ph = _phases(t)
        load = r.get("loadavg_before", [float("nan")])[0]
        vals = (t["calibration_s"], t["decomposition_s"], t.get("packing_s", 0.0), ph)
        vals += (r["wall_s"], r["cpu_s"], r["cpu_s"] / r["wall_s"], load)
        vals += (100 * r["calib_frac_peak"], r.get("ratio_phases", 1.0))
        print(f"{name:8}" + "".join(f"{v:9.2f}" for v in vals))


def _child(args) -> int:
    """One path, in this (fresh) process: load, quantize, the figures to ``<child-dir>/<path>.json``
    (the ids from ``<child-dir>/ids.npy``); ``torch``: the torch implementation."""
    from converters import load_model

    d = Path(args.child_dir)
    ids = np.load(d / "ids.npy")
    if args.child == "torch":
        from benchmarks import torch_reference

        m = load_model(args.model)
        model = torch_reference.torch_model(m.cfg, m.params)
        t0, c0 = time.perf_counter(), _cpu()
        _, tt = torch_reference.quantize(model, ids, rank=args.rank, batch_size=args.batch_size)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        doc = {"timings": tt, "wall_s": wall, "cpu_s": cpu, "cores": cpu / wall}
        doc["loadavg_after"] = os.getloadavg()
        (d / "torch.json").write_text(json.dumps(doc))
        return 0

    from arhq_jax.run.config import QuantConfig
    from arhq_jax.run.quantize import quantize_model, summarize
    from arhq_jax.run.stream import quantize_stream
    from converters.lazy import open_source

    qcfg = QuantConfig(method="arhq", rank=args.rank, w_fmt="nvfp4-paper", act_fmt="nvfp4-paper")
    t0 = time.perf_counter()
    if args.child == "memory":
        m = load_model(args.model)
        load_s, t0, c0 = time.perf_counter() - t0, time.perf_counter(), _cpu()
        res = quantize_model(m.params, m.cfg, ids, qcfg, batch_size=args.batch_size, progress=False)
    else:
        with open_source(args.model) as src:  # as `arhq-jax quantize` does
            load_s, t0, c0 = time.perf_counter() - t0, time.perf_counter(), _cpu()
            res = quantize_stream(
                src,
                ids,
                qcfg,
                d / "stream-out",
                quant=qcfg.to_dict(),
                source={"model": args.model},
                batch_size=args.batch_size,
                progress=False,
            )
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    doc = {
        "timings": res.timings,
        "wall_s": wall,
        "cpu_s": cpu,
        "cores": cpu / wall,  # CPU seconds per wall second: what the process got of the machine
        "loadavg_after": os.getloadavg(),
        "load_s": load_s,
        "loader": "load_model" if args.child == "memory" else "open_source",
        "diagnostics": summarize(res.projections),
    }
    (d / f"{args.child}.json").write_text(json.dumps(doc))
    return 0


def _run_children(names, tmp: str, args, source, rank: int, concurrent: bool) -> dict:
    """Each of ``names`` in a fresh process (as a user's CLI run: its compilations are its own),
    one after the other, or all at once with ``concurrent`` (then they share whatever load the
    machine has, so their ratios hold under a changing load) → {name: its figures}."""
    procs, load0 = {}, {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--child-dir", tmp]
        cmd += ["--model", str(source), "--rank", str(rank), "--batch-size", str(args.batch_size)]
        load0[name] = os.getloadavg()
        procs[name] = subprocess.Popen(cmd)
        if not concurrent:
            procs[name].wait()
    out = {}
    for name, proc in procs.items():
        if proc.wait() != 0:  # e.g. killed for memory: the others' figures are still reported
            print(f"pipeline.py: the {name} run failed (exit status {proc.returncode})")
            continue
        out[name] = {**json.loads((Path(tmp) / f"{name}.json").read_text())}
        out[name]["loadavg_before"] = load0[name]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", choices=("stream", "memory", "both"), default="both")
    ap.add_argument("--model", default="smollm2", help="smollm2, a .gguf, a HF or orbax dir")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="run the paths and torch at the same time (a shared machine: equal load for each)",
    )
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model, few tokens")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--child", choices=("stream", "memory", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    from arhq_jax.evaluation.pipeline import calibration_ids, load_corpus
    from converters import load_model

    tmp = tempfile.TemporaryDirectory(prefix="arhq-pipeline-")
    load_before = uptime()
    source, n_calib, seq_len, rank, peak_n = (
        args.model,
        args.calib_tokens,
        args.seq_len,
        args.rank,
        2048,
    )
    if args.tiny:
        from benchmarks import bench_tiny

        source = bench_tiny.tiny_hf_dir(Path(tmp.name) / "model")
        n_calib, seq_len, rank, peak_n = bench_tiny.CALIB_TOKENS, bench_tiny.SEQ_LEN, 4, 256
    t0 = time.perf_counter()
    m = load_model(source)
    load_s = time.perf_counter() - t0
    cfg = m.cfg
    corpus = bench_tiny.tiny_corpus() if args.tiny else load_corpus(m.tokenizer)
    ids = calibration_ids(corpus.calib, n_calib, seq_len)
    del m, corpus
    n_tok = int(ids.size)
    peak = matmul_peak(peak_n)
    ref_peak = max(peak.values())
    fl = flops(cfg, n_tok, seq_len, cfg.num_layers)
    out = {
        "model": str(args.model) if not args.tiny else "tiny",
        "calib_tokens": n_tok,
        "layers": cfg.num_layers,
        "peak_gflops": peak,
        "load_s": {"load_model": load_s},
        "concurrent": args.concurrent,
        "uptime_before": load_before,
        "loadavg_before": os.getloadavg(),
    }
    print(f"load_model({out['model']}): {load_s:.1f}s")
    paths = ("stream", "memory") if args.path == "both" else (args.path,)
    np.save(Path(tmp.name) / "ids.npy", ids)
    names = paths + (() if args.skip_torch else ("torch",))
    got = _run_children(names, tmp.name, args, source, rank, args.concurrent)
    paths = tuple(p for p in paths if p in got)
    for path in paths:
        r = got[path]
        jt = r["timings"]
        cal = (fl["forward"] + fl["g_jax"]) / jt["calibration_s"] / 1e9
        out[path] = {**r, "phases_s": _phases(jt), "calib_frac_peak": cal / ref_peak}
        out["load_s"][r["loader"]] = r.pop("load_s")
        written = ", checkpoint written" if path == "stream" else ""
        print(
            f"arhq-jax {path}: calibration {jt['calibration_s']:.1f}s, decomposition "
            f"{jt['decomposition_s']:.1f}s, packing {jt['packing_s']:.1f}s = "
            f"{_phases(jt):.1f}s of phases (wall {r['wall_s']:.1f}s{written}, CPU "
            f"{r['cpu_s']:.1f}s; "
            f"{r['loader']} {out['load_s'][r['loader']]:.1f}s before) on {n_tok} tokens; "
            f"calibration {cal:.0f} GFLOP/s = {cal / ref_peak:.0%} of peak"
        )
        print(f"  diagnostics (means over projections): {r['diagnostics']}")
    if "torch" in got:
        r = got["torch"]
        tt = r.pop("timings")
        cal_t = (fl["forward"] + fl["g_torch"]) / tt["calibration_s"] / 1e9
        out["torch"] = {**tt, **r, "calib_frac_peak": cal_t / ref_peak}
        print(
            f"torch: calibration {tt['calibration_s']:.1f}s, decomposition "
            f"{tt['decomposition_s']:.1f}s (wall {r['wall_s']:.1f}s, CPU {r['cpu_s']:.1f}s); "
            f"calibration {cal_t:.0f} "
            f"GFLOP/s = {cal_t / ref_peak:.0%} of peak"
        )
        torch_phases = tt["calibration_s"] + tt["decomposition_s"]
        for path in paths:
            r = out[path]
            jt = r["timings"]
            r["ratio_phases"] = torch_phases / r["phases_s"]
            r["ratio_calibration"] = tt["calibration_s"] / jt["calibration_s"]
            # torch's decomposition step also fake-quantizes the residual: our packing's work
            r["ratio_decomposition"] = tt["decomposition_s"] / (
                jt["decomposition_s"] + jt["packing_s"]
            )
            r["ratio_wall"] = out["torch"]["wall_s"] / r["wall_s"]
            r["ratio_cpu"] = out["torch"]["cpu_s"] / r["cpu_s"]
            print(
                f"ratio torch / arhq-jax {path}: {r['ratio_phases']:.2f}x (phases: calibration "
                f"{r['ratio_calibration']:.2f}x, decomposition + packing "
                f"{r['ratio_decomposition']:.2f}x), {r['ratio_wall']:.2f}x (wall), "
                f"{r['ratio_cpu']:.2f}x (CPU seconds)"
            )
    if len(paths) == 2:
        s, mem = out["stream"], out["memory"]
        out["stream_over_memory"] = {
            "phases": s["phases_s"] / mem["phases_s"],
            "cpu": s["cpu_s"] / mem["cpu_s"],
        }
        print(
            f"stream / memory: phases {s['phases_s'] / mem['phases_s']:.3f}, CPU seconds "
            f"{s['cpu_s'] / mem['cpu_s']:.3f}"
        )
    out["uptime_after"] = uptime()
    out["loadavg_after"] = os.getloadavg()
    _table(out, paths)
    print(
        f"f32 matmul peak: jnp {peak['jnp']:.0f}, torch {peak['torch']:.0f} GFLOP/s; "
        f"model FLOPs: forward {fl['forward'] / 1e12:.2f} T, G {fl['g_jax'] / 1e12:.2f} T "
        f"(arhq-jax) / {fl['g_torch'] / 1e12:.2f} T (torch)"
    )
    print(f"load before: {load_before}\nload after:  {out['uptime_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    tmp.cleanup()
    return 0 if len(got) == len(names) else 1  # a failed run fails the script (and its smoke test)


if __name__ == "__main__":
    sys.exit(main())
