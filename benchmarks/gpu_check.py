"""The one script a lent GPU runs: correctness of every kernel, then device times (≤ 8 minutes).

Sections, each time-boxed (a section stops starting new rows when its budget is spent), with the
results file rewritten after every row so that a run cut short still leaves its numbers:

1. ``versions``: jax / jaxlib / plugin versions, the device, its compute capability.
2. ``tests``: the GPU tests' asserts in-process: every case of the kernel tests ``CASES``
   compiled for the GPU and compared to the jnp reference (≤ 1e-6 relative in f32, ≤ 1e-2 for bf16
   output), and kernel 1's packed output bit for bit against ``formats.quantize``.
3. ``limits``: measured copy bandwidth (x + 1 over 1 GiB, read + write) and an 8192³ bf16 dot.
4. ``projections``: the Llama-3-8B and Qwen3-4B projections at M ∈ {1, 16, 128, 2048}: the Pallas
   path, the unfused XLA path (``quant_matmul_ref``) and a bf16 ``jnp.dot`` on dense weights, timed
   from the **profiler's device events** (the kernels' own durations on the GPU, summed per call),
   not wall clock. Weights rotate over copies totalling > 3× the 50 MB L2.

    python benchmarks/gpu_check.py                 # on the GPU: writes results/gpu_check_<dev>.json
    python benchmarks/gpu_check.py --cpu-smoke     # CPU: the same sections, interpret mode, tiny

``--cpu-smoke`` runs every section end to end on CPU in Pallas interpret mode with tiny shapes (a
test runs it); its times are not device times and it says so.
"""

from __future__ import annotations

import argparse
import ast
import functools
import glob
import gzip
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arhq_jax.linears.quantized import quant_matmul_ref  # noqa: E402
from arhq_jax.numerics import formats  # noqa: E402
from pallas_kernels.fp4_matmul import fp4_lowrank_matmul, quantize_activations  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTIONS = {  # distinct [N, K]
    "llama3-8b": {
        "q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
    },
    "qwen3-4b": {
        "q": (4096, 2560), "k/v": (1024, 2560), "o": (2560, 4096), "gate/up": (9728, 2560),
        "down": (2560, 9728),
    },
}  # fmt: skip
SMOKE_PROJECTIONS = {"tiny": {"p": (96, 128)}}
MS = (1, 16, 128, 2048)
SMOKE_MS = (1,)
RANK = 32
L2_BYTES = 50e6
BUDGET_S = {"tests": 150, "limits": 30, "projections": 270}  # 7.5 min + start-up < 8 min
BITS = {"nvfp4": 4.5, "mxfp4": 4.25}


class Results:
    """The results file, rewritten (atomically) after every row."""

    def __init__(self, path: str, head: dict):
        self.path = path
        self.data = dict(head, sections={})
        self.write()

    def add(self, section: str, row: dict) -> None:
        self.data["sections"].setdefault(section, []).append(row)
        self.write()

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def rel_err(y, y_ref) -> float:
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    return float(np.max(np.abs(y - y_ref)) / max(np.max(np.abs(y_ref)), 1e-30))


# ---------------------------------------------------------------------------------------------
# Device time from the profiler
# ---------------------------------------------------------------------------------------------


def profile_device_us(fn, args, calls: int, smoke: bool) -> dict:
    """Run ``fn(*args)`` ``calls`` times under the profiler; device µs per call.

    The kernels' durations are the complete ("X") events on the device's stream lines of the
    trace (process named ``/device:GPU:*``, threads named ``Stream ...``), summed and divided by
    ``calls``. On CPU (smoke) there is no device line: the wall time is reported and marked so.
    """
    jax.block_until_ready(fn(*args))  # compile + warm up outside the trace
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        wall = (time.perf_counter() - t0) / calls
        paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        ev = json.load(gzip.open(paths[0])) if paths else {}
    events = ev.get("traceEvents", ev if isinstance(ev, list) else [])
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    dev = {p for p, n in procs.items() if "/device:GPU" in n}
    kern = [
        e for e in events
        if e.get("ph") == "X" and e.get("pid") in dev
        and "stream" in threads.get((e["pid"], e.get("tid")), "").lower()
    ]  # fmt: skip
    if kern:
        return dict(device_us=sum(e["dur"] for e in kern) / calls, kernels=len(kern) / calls,
                    source="profiler device events", wall_us=wall * 1e6)  # fmt: skip
    return dict(device_us=None, source="no device events (CPU)" if smoke else "no device events",
                wall_us=wall * 1e6)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def section_versions(smoke: bool) -> dict:
    d = jax.devices()[0]
    row = dict(
        jax=jax.__version__, jaxlib=__import__("jaxlib").__version__,
        python=platform.python_version(),
        backend=jax.default_backend(), device=str(getattr(d, "device_kind", d.platform)),
        devices=len(jax.devices()), mode="cpu-smoke (interpret)" if smoke else "gpu",
    )  # fmt: skip
    for attr in ("compute_capability", "core_count"):
        if hasattr(d, attr):
            row[attr] = str(getattr(d, attr))
    try:
        from importlib.metadata import version  # noqa: PLC0415

        import jax_plugins  # noqa: F401, PLC0415

        row["cuda_plugin"] = version("jax-cuda12-plugin")
    except Exception:
        pass
    return row


def test_cases() -> list[tuple]:
    """``CASES`` of the kernel tests, read as a literal (no pytest import)."""
    tree = ast.parse(
        open(os.path.join(ROOT, "tests", "pallas_kernels", "test_fp4_matmul.py")).read()
    )
    return next(
        ast.literal_eval(n.value) for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CASES"
    )  # fmt: skip


def make_case(m, n, k, r, w_fmt, *, smooth, bias, dtype, seed=0):
    """As the kernel tests make_case: activations with outliers, bf16 factors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.exp(rng.standard_normal(k))
    w = formats.quantize(jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32), w_fmt)
    a = b = s = bb = None
    if r:
        a = jnp.asarray(rng.standard_normal((k, r)) * 0.05, jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((n, r)) * 0.05, jnp.bfloat16)
    if smooth:
        s = jnp.asarray(np.exp(rng.standard_normal(k) * 0.5), jnp.float32)
    if bias:
        bb = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return jnp.asarray(x, dtype), w, a, b, s, bb


def section_tests(res: Results, smoke: bool, deadline: float) -> None:
    cases = test_cases()
    if smoke:  # tiny: the decode-sized cases only
        cases = [c for c in cases if c[0] <= 7][:3]
    for case in cases:
        if time.time() > deadline:
            res.add("tests", dict(case="(time box reached)", skipped=True))
            return
        m, n, k, r, wf, af, sm, bias, dt, tiles = case
        row = dict(case="-".join(map(str, case[:9])), tiles=tiles)
        try:
            x, w, a, b, s, bb = make_case(m, n, k, r, wf, smooth=sm, bias=bias,
                                          dtype=jnp.dtype(dt))  # fmt: skip
            kw = (
                {}
                if tiles is None
                else dict(zip(("block_m", "block_n", "block_k"), tiles, strict=True))
            )
            f = jax.jit(functools.partial(fp4_lowrank_matmul, act_fmt=af, interpret=smoke, **kw))
            y = f(x, w, a, b, s, bias=bb)
            err = rel_err(y, quant_matmul_ref(x, w, a, b, s, af, bias=bb))
            tol = 1e-6 if dt == "float32" else 1e-2
            row.update(rel_err=err, tol=tol, ok=bool(err <= tol))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        res.add("tests", row)
    for fmt in ("nvfp4", "nvfp4-modelopt", "mxfp4"):
        if time.time() > deadline:
            break
        row = dict(case=f"kernel1-packed-{fmt}")
        try:
            rng = np.random.default_rng(1)
            rows, k = (8, 64) if smoke else (64, 512)
            x = rng.standard_normal((rows, k)) * np.exp(rng.standard_normal(k))
            grid = np.round(rng.standard_normal((rows, k)) * 8) / 8
            x = jnp.asarray(np.concatenate([x, grid, x * 1e-3]), jnp.float32)
            codes, scales, _ = quantize_activations(x, fmt, interpret=smoke)
            want = formats.quantize(x, fmt)
            u8 = lambda v: np.asarray(jax.lax.bitcast_convert_type(v, jnp.uint8))  # noqa: E731
            ok = np.array_equal(np.asarray(codes), np.asarray(want.codes)) and np.array_equal(
                u8(scales), u8(want.scales)
            )
            row.update(ok=bool(ok))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        res.add("tests", row)


def section_limits(res: Results, smoke: bool) -> dict:
    n = 2**12 if smoke else 2**28  # f32 elements: 1 GiB on the GPU
    x = jnp.ones((n,), jnp.float32)
    t = profile_device_us(jax.jit(lambda x: x + 1), (x,), 3 if smoke else 10, smoke)
    us = t["device_us"] or t["wall_us"]
    row = dict(what="copy x+1", bytes=2 * x.nbytes, **t, GBps=2 * x.nbytes / us / 1e3)
    res.add("limits", row)
    del x
    d = 128 if smoke else 8192
    a = jnp.ones((d, d), jnp.bfloat16)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    t = profile_device_us(dot, (a, a), 3 if smoke else 10, smoke)
    us = t["device_us"] or t["wall_us"]
    row2 = dict(what=f"bf16 dot {d}^3", **t, TFLOPs=2 * d**3 / us / 1e6)
    res.add("limits", row2)
    return dict(copy_GBps=row["GBps"], bf16_TFLOPs=row2["TFLOPs"])


def section_projections(res: Results, smoke: bool, deadline: float, limits: dict) -> None:
    projs = SMOKE_PROJECTIONS if smoke else PROJECTIONS
    ms = SMOKE_MS if smoke else MS
    # The most telling rows first (Llama decode), so that a time box cuts the least useful.
    order = [(model, proj, nk, m, fmt, mode)
             for m in ms for model, ps in projs.items() for proj, nk in ps.items()
             for fmt in ("nvfp4", "mxfp4") for mode in ("w4a4", "w4a16")]  # fmt: skip
    layers, dense = {}, {}
    calls = 2 if smoke else 3
    for model, proj, (n, k), m, fmt, mode in order:
        if time.time() > deadline:
            res.add("projections", dict(row="(time box reached)", skipped=True))
            return
        row = dict(model=model, proj=proj, N=n, K=k, M=m, fmt=fmt, mode=mode, rank=RANK)
        try:
            key = (n, k, fmt)
            if key not in layers:
                rng = np.random.default_rng(0)
                w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32)
                q = formats.quantize(w, fmt)
                copies = 1 if smoke else max(1, min(8, math.ceil(3 * L2_BYTES / (n * k * 0.55))))
                qs = [jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), q)
                      for _ in range(copies)]  # fmt: skip
                a = jnp.asarray(rng.standard_normal((k, RANK)) * 0.02, jnp.bfloat16)
                b = jnp.asarray(rng.standard_normal((n, RANK)) * 0.02, jnp.bfloat16)
                s = jnp.asarray(np.exp(rng.standard_normal(k) * 0.3), jnp.float32)
                layers = {key: (w.astype(jnp.bfloat16), qs, a, b, s)}  # one layer alive at a time
            w16, qs, a, b, s = layers[key]
            act = fmt if mode == "w4a4" else None
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
            pallas, xla = _per_copy_fns(act, smoke)
            y, y_ref = pallas(x, qs[:1], a, b, s)[0], xla(x, qs[:1], a, b, s)[0]
            row["rel_err_vs_jnp"] = rel_err(y, y_ref)
            nq = len(qs)
            tp = profile_device_us(pallas, (x, qs, a, b, s), calls, smoke)
            tx = profile_device_us(xla, (x, qs, a, b, s), calls, smoke)
            row["pallas"] = {kk: (v / nq if kk in ("device_us", "wall_us", "kernels") and v else v)
                             for kk, v in tp.items()}  # fmt: skip
            row["xla_unfused"] = {kk: (v / nq if kk in ("device_us", "wall_us", "kernels") and v
                                       else v) for kk, v in tx.items()}  # fmt: skip
            dkey = (n, k, m)
            if dkey not in dense:
                w16s = [w16] if smoke else [jnp.array(w16, copy=True) for _ in range(
                    max(1, min(4, math.ceil(3 * L2_BYTES / (n * k * 2)))))]  # fmt: skip
                dot = jax.jit(lambda x, ws: [jnp.dot(x, w.T) for w in ws])
                td = profile_device_us(dot, (x, w16s), calls, smoke)
                dense = {dkey: {kk: (v / len(w16s) if kk in ("device_us", "wall_us", "kernels")
                                     and v else v) for kk, v in td.items()}}  # fmt: skip
            row["bf16_dot"] = dense[dkey]
            byts = n * k * BITS[fmt] / 8 + RANK * (k + n) * 2 + k * 4 + m * k * 2 + m * n * 2
            row["compulsory_bytes"] = byts
            tpu = row["pallas"]["device_us"]
            if tpu and limits:
                row["frac_copy_bw"] = byts / (tpu * 1e-6) / (limits["copy_GBps"] * 1e9)
                row["frac_bf16_dot"] = (2 * m * n * k / (tpu * 1e-6)) / (
                    limits["bf16_TFLOPs"] * 1e12
                )
                for v in ("xla_unfused", "bf16_dot"):
                    tv = row[v]["device_us"]
                    row[f"speedup_vs_{v}"] = tv / tpu if tv else None
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            row["traceback"] = traceback.format_exc()[-1500:]
        res.add("projections", row)
        print(_fmt_row(row), flush=True)


def _per_copy_fns(act, smoke: bool):
    """Jitted Pallas and unfused-XLA calls over a list of weight copies (L2 rotation)."""
    kern = functools.partial(fp4_lowrank_matmul, act_fmt=act, interpret=smoke)
    pallas = jax.jit(lambda x, qs, a, b, s: [kern(x, q, a, b, s) for q in qs])
    xla = jax.jit(lambda x, qs, a, b, s: [quant_matmul_ref(x, q, a, b, s, act) for q in qs])
    return pallas, xla


def _fmt_row(row) -> str:
    if "error" in row:
        return f"  {row['model']} {row['proj']} M={row['M']} {row['fmt']}/{row['mode']}: ERROR"
    t = {
        v: (row[v]["device_us"] or row[v]["wall_us"]) for v in ("pallas", "xla_unfused", "bf16_dot")
    }
    return (f"  {row['model']:>9} {row['proj']:<7} M={row['M']:<5} {row['fmt']}/{row['mode']:<5} "
            f"pallas {t['pallas']:8.1f} µs  xla {t['xla_unfused']:8.1f} µs  bf16 dot "
            f"{t['bf16_dot']:8.1f} µs  err {row['rel_err_vs_jnp']:.1e}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, interpret mode, tiny shapes")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    p.add_argument("--sections", default="versions,tests,limits,projections")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and jax.default_backend() != "gpu":
        raise SystemExit("gpu_check: no GPU here; run with --cpu-smoke for the CPU smoke mode")
    vers = section_versions(smoke)
    name = "cpu-smoke" if smoke else "".join(
        c if c.isalnum() else "-" for c in vers["device"]).strip("-").lower()  # fmt: skip
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_check_{name}.json")
    res = Results(out, dict(versions=vers, budget_s=BUDGET_S, started=time.time()))
    print(f"gpu_check: {vers['device']} jax {vers['jax']} ({vers['mode']}) -> {out}", flush=True)
    sections = args.sections.split(",")
    limits = {}
    t0 = time.time()
    if "tests" in sections:
        section_tests(res, smoke, time.time() + BUDGET_S["tests"])
        tests = res.data["sections"].get("tests", [])
        bad = [r["case"] for r in tests if not r.get("ok") and not r.get("skipped")]
        print(
            f"tests: {len(tests) - len(bad)}/{len(tests)} ok" + (f"; FAILED {bad}" if bad else "")
        )
    if "limits" in sections:
        limits = section_limits(res, smoke)
        print(f"limits: copy {limits['copy_GBps']:.0f} GB/s, bf16 {limits['bf16_TFLOPs']:.1f} "
              "TFLOP/s" + (" (CPU wall clock: not device numbers)" if smoke else ""))  # fmt: skip
    if "projections" in sections:
        section_projections(res, smoke, time.time() + BUDGET_S["projections"], limits)
    res.data["elapsed_s"] = time.time() - t0
    res.write()
    tests = res.data["sections"].get("tests", [])
    failed = sum(1 for r in tests if not r.get("ok") and not r.get("skipped"))
    errors = sum(1 for r in res.data["sections"].get("projections", []) if "error" in r)
    summary = dict(tests=len(tests), tests_failed=failed, projection_errors=errors,
                   elapsed_s=round(res.data["elapsed_s"], 1), out=out)  # fmt: skip
    print(json.dumps(summary))
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
