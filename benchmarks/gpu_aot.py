"""Deviceless GPU compile of the FP4 kernels and a static roofline model (``make gpu-aot``).

No GPU is needed: jax's ahead-of-time path runs XLA's real GPU pipeline (Pallas → Triton → PTX →
ptxas) for an H100 or H200 *target description* (``--target-dir``, default ``/work/shared/gpu``),
as in docs/spec/kernels.md §11. Run it in its own environment (``.venv-aot``: Python 3.12, jax
0.11.2 + the CUDA 12 plugin + the nvcc wheel's ptxas, pinned in
``benchmarks/gpu_aot_requirements.txt``), never the test venv. ``make gpu-aot`` builds that venv,
puts a ptxas wrapper in front of the real one (it adds ``-v`` and keeps the PTX and the ptxas
report of every kernel in ``$PTXAS_KEEP_DIR``) and runs this script.

For every configuration (the projections of Llama-3-8B and Qwen3-4B at M ∈ {1, 16, 128, 2048},
nvfp4 and mxfp4, W4A4 and W4A16, rank 32, as ``benchmarks/fp4_kernels.py`` runs them; Llama-3-8B's
*served* projections at M ∈ {1, 16}, q/k/v and gate/up fused as vLLM fuses them (``SERVED``); the
GPU tests' cases) it compiles the Pallas path and the unfused XLA path (``quant_matmul_ref``) and
reports per Pallas kernel: registers, spill bytes, shared memory, whether it uses tensor-core
instructions (mma / wgmma), its K-loop body and the PTX instructions per weight of that loop, and
per call the kernels launched (XLA's thunk sequence).

The static roofline model, per launched kernel k (all sizes from the compiled HLO and PTX):

    t_k = max(bytes_k / HBM bandwidth, instr_k / (active SMs × 4 × 32 × clock), flops_k / peak_k)
    t   = Σ_k t_k + launches × launch cost

bytes_k: the kernel's operand and result buffers (each read or written once: re-reads are assumed
to hit L2); instr_k: dynamic PTX instructions per thread × threads × programs, with the K loop's
body × its trip count (loops of XLA's own kernels are counted once); flops_k: the matmul work at
the bf16 tensor-core peak when the kernel issues mma/wgmma (a dot without them is already FMA
instructions in instr_k); XLA's cuBLAS / library GEMMs (no PTX here) at the bf16 peak for bf16
operands and the f32 FMA peak otherwise. What the model leaves out is listed in
docs/spec/kernels.md §11: latency and occupancy, L2 and shared-memory bandwidth, tile
quantization of partial waves, the wait between dependent launches beyond ``--launch-us``, clock
throttling, and anything that only running on a GPU would show.

Output: ``<out>_<target>.json`` (written after every configuration) and ``<out>_<target>.md`` (the
table); the last line printed is the JSON summary
``{"configs", "errors", "spill_configs", "no_mma_configs", "decode_roofline_min",
"decode_roofline_median", "prefill_vs_xla_min", "decode_roofline_min_unfused",
"decode_roofline_median_unfused", ...}`` (decode over the served rows; ``_unfused`` over the
per-projection rows).

    .venv-aot/bin/python benchmarks/gpu_aot.py --targets h100,h200
    .venv-aot/bin/python benchmarks/gpu_aot.py --quick        # a few configurations
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA runtime: compile only
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import pallas_kernels.fp4_matmul as fp4_matmul  # noqa: E402
from arhq_jax.linears.quantized import quant_matmul_ref  # noqa: E402
from arhq_jax.numerics import formats  # noqa: E402

# Static machine numbers (datasheet, sm_90): the model's constants, not measurements.
TARGETS = {
    "h100": dict(
        file="h100_sxm.txtpb", name="H100 SXM", sms=132, clock_hz=1.98e9, hbm_Bps=3.35e12,
        bf16_flops=989.4e12, f32_fma_flops=66.9e12,
    ),
    "h200": dict(
        file="h100_sxm.txtpb", name="H200 SXM", sms=132, clock_hz=1.98e9, hbm_Bps=4.8e12,
        bf16_flops=989.4e12, f32_fma_flops=66.9e12,
        edit={"memory_bandwidth": 4800000000000, "device_memory_size": 150754820096},
    ),
}  # fmt: skip
ISSUE_PER_SM_CYCLE = 4 * 32  # 4 schedulers, one warp instruction each per cycle: thread-instrs
LAUNCH_US = 1.0  # per launched kernel (see docs/spec/kernels.md §11)
RANK = 32
MODELS = {  # distinct [N, K] of the projections (q, k/v, o, gate/up, down)
    "llama3-8b": {
        "q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
    },
    "qwen3-4b": {
        "q": (4096, 2560), "k/v": (1024, 2560), "o": (2560, 4096), "gate/up": (9728, 2560),
        "down": (2560, 9728),
    },
}  # fmt: skip
# The projections as vLLM serves Llama: q/k/v as one qkv_proj (QKVParallelLinear: the three
# weights concatenated along N, N = q + k + v) and gate/up as one gate_up_proj
# (MergedColumnParallelLinear, N = 2 × intermediate); o and down stay single. Our compressed-
# tensors export ties the fused partitions' NVFP4 global scales (calibration/global_scales.py
# ``fused_weight_scales``), so one kernel call with one weight tensor scale runs each of them.
SERVED = {
    "llama3-8b": {
        "qkv": (4096 + 2 * 1024, 4096), "o": (4096, 4096), "gate_up": (2 * 14336, 4096),
        "down": (4096, 14336),
    },
}  # fmt: skip
SERVED_MS = (1, 16)
MS = (1, 16, 128, 2048)
FORMATS = ("nvfp4", "mxfp4")
BITS = {"nvfp4": 4.5, "mxfp4": 4.25}
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e8m0fnu": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
    "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def gpu_test_cases() -> list[dict]:
    """The cases of the GPU tests (``CASES`` in the kernel tests), read as a literal: the
    test module itself needs pytest, which this environment does not have."""
    tree = ast.parse(
        open(os.path.join(ROOT, "tests", "pallas_kernels", "test_fp4_matmul.py")).read()
    )
    raw = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CASES"
    )
    cases = []
    for m, n, k, r, wf, af, sm, bias, dt, tiles in raw:
        cases.append(
            dict(group="gpu-tests", model="test", proj=f"{n}x{k}", N=n, K=k, M=m, rank=r,
                 fmt=wf, act=af, smooth=sm, bias=bias, dtype=dt, tiles=tiles)
        )  # fmt: skip
    return cases


def benchmark_configs(models=MODELS, ms=MS, fmts=FORMATS) -> list[dict]:
    """The projections as benchmarks/fp4_kernels.py runs them: bf16 x, smoothing, rank 32,
    W4A4 with the activation format = the weight format, default tiles."""
    out = []
    for model, projs in models.items():
        for proj, (n, k) in projs.items():
            for m in ms:
                for fmt in fmts:
                    for mode in ("w4a4", "w4a16"):
                        out.append(
                            dict(group="bench", model=model, proj=proj, N=n, K=k, M=m,
                                 rank=RANK, fmt=fmt, act=fmt if mode == "w4a4" else None,
                                 smooth=True, bias=False, dtype="bfloat16", tiles=None)
                        )  # fmt: skip
    return out


def served_configs(models=SERVED, ms=SERVED_MS, fmts=FORMATS) -> list[dict]:
    """The fused projections as a served checkpoint runs them (docs/spec/kernels.md §11): bf16 x
    without smoothing (the hardware checkpoint has none: docs/checkpoint.md), rank 32, and the
    static activation tensor scale that compressed-tensors stores (``input_global_scale``) for
    nvfp4 W4A4, so no max|x| reduction runs before the kernels."""
    out = []
    for model, projs in models.items():
        for proj, (n, k) in projs.items():
            for m in ms:
                for fmt in fmts:
                    for mode in ("w4a4", "w4a16"):
                        act = fmt if mode == "w4a4" else None
                        out.append(
                            dict(group="served", model=model, proj=proj, N=n, K=k, M=m,
                                 rank=RANK, fmt=fmt, act=act, smooth=False, bias=False,
                                 dtype="bfloat16", tiles=None, static_act=act == "nvfp4")
                        )  # fmt: skip
    return out


def config_id(c: dict) -> str:
    mode = "w4a16" if c["act"] is None else f"w4a4-{c['act']}"
    tag = "served:" if c.get("group") == "served" else ""
    return (
        f"{tag}{c['model']}:{c['proj']}:{c['N']}x{c['K']}:M{c['M']}:{c['fmt']}:{mode}:r{c['rank']}"
    )


# ---------------------------------------------------------------------------------------------
# Compile one function deviceless and collect what XLA and ptxas produced
# ---------------------------------------------------------------------------------------------


def make_topology(target: str, target_dir: str):
    t = TARGETS[target]
    text = open(os.path.join(target_dir, t["file"])).read()
    for key, val in t.get("edit", {}).items():
        text, n = re.subn(rf"({key}:\s*)\d+", rf"\g<1>{val}", text)
        if n != 1:
            raise ValueError(f"target description: no single {key} field to edit")
    topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
    return topologies.make_mesh(topo, (1,), ("x",))


def abstract_args(c: dict, mesh):
    """ShapeDtypeStructs (with the mesh's sharding) for x, w, a, b, s, bias of config ``c``."""
    sh = NamedSharding(mesh, P())

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    m, n, k, r = c["M"], c["N"], c["K"], c["rank"]
    w = jax.eval_shape(lambda: formats.quantize(jnp.zeros((n, k), jnp.float32), c["fmt"]))
    w = jax.tree_util.tree_map(lambda v: sds(v.shape, v.dtype), w)
    x = sds((m, k), jnp.dtype(c["dtype"]))
    a = sds((k, r), jnp.bfloat16) if r else None
    b = sds((n, r), jnp.bfloat16) if r else None
    s = sds((k,), jnp.float32) if c["smooth"] else None
    bias = sds((n,), jnp.float32) if c["bias"] else None
    g = sds((), jnp.float32) if c.get("static_act") else None
    return x, w, a, b, s, bias, g


def pallas_fn(c: dict):
    # Deviceless: jax's default backend is the CPU, so the kernel's "need a GPU" guard is skipped
    # (the compile below targets the abstract GPU mesh).
    fp4_matmul._check_backend = lambda interpret: None
    kw = {}
    if c["tiles"] is not None:
        kw = dict(zip(("block_m", "block_n", "block_k"), c["tiles"], strict=True))
    kw.update(c.get("kernel_kw", {}))

    def f(x, w, a, b, s, bias, g):
        return fp4_matmul.fp4_lowrank_matmul(
            x, w, a, b, s, c["act"], bias=bias, act_tensor_scale=g, **kw
        )

    return f


def xla_fn(c: dict):
    def f(x, w, a, b, s, bias, g):
        return quant_matmul_ref(x, w, a, b, s, c["act"], bias=bias, act_tensor_scale=g)

    return f


def compile_collect(fn, args, mesh, workdir: str) -> dict:
    """Compile ``fn(*args)`` for the mesh's GPU; return HLO, thunks and per-kernel PTX stats."""
    dump = os.path.join(workdir, "dump")
    keep = os.path.join(workdir, "keep")
    for d in (dump, keep):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    os.environ["PTXAS_KEEP_DIR"] = keep
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(fn).trace(*args).lower().compile(compiler_options={"xla_dump_to": dump})
    hlo = _read_one(dump, "*gpu_after_optimizations.txt")
    thunks = _read_one(dump, "*thunk_sequence.txt")
    kernels = {}
    for ptx_path in glob.glob(os.path.join(keep, "*.ptx")):
        ptx = open(ptx_path).read()
        log_path = ptx_path[:-4] + ".log"
        log = open(log_path).read() if os.path.exists(log_path) else ""
        for name, st in parse_ptx(ptx, log).items():
            kernels[name] = st
    del compiled  # (cost_analysis() is None without a device: flops come from the config)
    return dict(hlo=hlo, thunks=thunks, kernels=kernels)


def _read_one(d: str, pattern: str) -> str:
    paths = sorted(glob.glob(os.path.join(d, pattern)))
    return open(paths[-1]).read() if paths else ""


# ---------------------------------------------------------------------------------------------
# Parsing: PTX (+ ptxas -v), thunk sequence, HLO buffer sizes
# ---------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(", re.M)
_LABEL = re.compile(r"^(\$L__\w+):")
_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def parse_ptx(ptx: str, log: str) -> dict[str, dict]:
    """Per entry function: static instruction counts, the largest loop, mma use, ptxas stats."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        body = ptx[pos:end].splitlines()
        instr_idx, labels, loops = [], {}, []
        for ln, line in enumerate(body):
            s = line.strip()
            lab = _LABEL.match(s)
            if lab:
                labels[lab.group(1)] = ln
                continue
            if not s.endswith(";") or s.startswith((".", "//")):
                continue
            instr_idx.append(ln)
            br = _BRA.search(s)
            if br and br.group(1) in labels:  # a backward branch closes a loop
                loops.append((labels[br.group(1)], ln))
        n_instr = len(instr_idx)
        loop = max(loops, key=lambda lo: lo[1] - lo[0], default=None)
        in_loop = 0
        if loop:
            in_loop = sum(1 for ln in instr_idx if loop[0] <= ln <= loop[1])
        text = "\n".join(body)
        out[name] = dict(
            instr_static=n_instr,
            loop_instr=in_loop,
            mma=len(re.findall(r"\bmma\.sync\b", text)),
            wgmma=len(re.findall(r"\bwgmma\.mma_async\b", text)),
            fma_f32=len(re.findall(r"\bfma\.rn\.f32\b", text)),
            **parse_ptxas(log, name),
        )
    return out


def parse_ptxas(log: str, name: str) -> dict:
    m = re.search(
        rf"Function properties for {re.escape(name)}\s*\n\s*(\d+) bytes stack frame, (\d+) bytes "
        rf"spill stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers(.*)",
        log,
    )
    if not m:
        return dict(registers=None, stack=None, spill_stores=None, spill_loads=None, smem=None)
    smem = re.search(r"(\d+) bytes smem", m.group(5))
    return dict(
        stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)),
        registers=int(m.group(4)), smem_static=int(smem.group(1)) if smem else 0,
    )  # fmt: skip


_THUNK = re.compile(
    r"^\d+: (k\w+)\s+\[.*?\]\s*(\S+)?(?: grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), "
    r"(\d+)\]\s+shared_memory: (\d+) bytes)?"
)


def parse_thunks(text: str) -> list[dict]:
    """Launched kernels (and copies / library calls) in order, from XLA's thunk sequence."""
    out = []
    for line in text.splitlines():
        m = _THUNK.match(line.strip())
        if not m or m.group(1) in ("kSequential", "kWaitForStreams"):
            continue
        kind, name = m.group(1), m.group(2)
        row = dict(kind=kind, name=name if m.group(3) else kind)
        if m.group(3):
            g = [int(m.group(i)) for i in (3, 4, 5)]
            t = [int(m.group(i)) for i in (6, 7, 8)]
            row.update(programs=math.prod(g), grid=g, threads=math.prod(t), smem=int(m.group(9)))
        out.append(row)
    return out


_TYPE = re.compile(r"\b(\w+)\[([\d,]*)\]")


def _type_bytes(t: str) -> list[int]:
    """Byte sizes of an HLO type string (a tuple gives one entry per element)."""
    out = []
    for dt, dims in _TYPE.findall(t):
        if dt not in DTYPE_BYTES:
            continue
        out.append(DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d))
    return out


def hlo_buffer_bytes(hlo: str) -> dict[str, int]:
    """Operand + result bytes of each instruction of the ENTRY computation, by name."""
    entry = hlo[hlo.find("\nENTRY") :]
    sizes, out = {}, {}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) (\S+?)\((.*?)\)", line)
        if not m:
            continue
        name, typ, _op, operands = m.groups()
        sizes[name] = _type_bytes(typ)
        opb = 0
        seen = set()
        for ref in re.findall(r"%([\w.\-]+)(?:#(\d+))?", operands):
            if ref in seen or ref[0] not in sizes:
                continue
            seen.add(ref)
            el = sizes[ref[0]]
            opb += el[int(ref[1])] if ref[1] and int(ref[1]) < len(el) else sum(el)
        name = name.replace(".", "_")  # the thunk sequence spells fusion.3 as fusion_3
        out[name] = sum(sizes[m.group(1)]) + opb
        for alias in re.findall(r'(?:scheduling_name="|, name = ")([\w.\-]+)"', line):
            # The thunk sequence names fusions by scheduling name and Pallas calls by kernel name.
            out.setdefault(alias.replace(".", "_"), out[name])
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def pallas_flops(name: str, c: dict, tiles) -> float:
    """Matmul work of one Pallas kernel (padded sizes, as the tensor cores see them)."""
    bm, bn, bk = tiles
    mp = -(-c["M"] // bm) * bm
    np_ = -(-c["N"] // bn) * bn
    kp = -(-c["K"] // bk) * bk
    rp = max(16, 1 << (c["rank"] - 1).bit_length()) if c["rank"] else 0
    if "gemm" in name:
        return 2.0 * mp * np_ * kp + 2.0 * mp * rp * np_
    if "act" in name:
        return 0.0 if _t_in_xla(c) else 2.0 * mp * kp * rp
    return 0.0


def _t_in_xla(c: dict) -> bool:
    """Whether this version of the kernels leaves t = (x/s)·A to XLA at this M (the kernels
    before the decode rework did at M <= 64)."""
    limit = getattr(fp4_matmul, "_T_IN_KERNEL_MIN_M", None)
    return bool(c["rank"]) and limit is not None and c["M"] <= limit


def k_trip(name: str, c: dict, tiles) -> int:
    """K-loop trips of one program: the K tiles, divided among kernel 2's split-K slices."""
    kp = -(-c["K"] // tiles[2]) * tiles[2]
    split = resolve_split(c, tiles) if "gemm" in name else 1
    return max(1, kp // tiles[2] // split)


def resolve_split(c: dict, tiles) -> int:
    """Kernel 2's split-K factor for this configuration (1 for kernels without split-K)."""
    if "split_k" in c.get("kernel_kw", {}):
        return c["kernel_kw"]["split_k"]
    choose = getattr(fp4_matmul, "choose_split", None)
    if choose is None:
        return 1
    bm, bn, bk = tiles
    kp = -(-c["K"] // bk) * bk
    return choose(-(-c["M"] // bm), -(-c["N"] // bn), kp // bk)


def model_call(res: dict, c: dict, tiles, tgt: dict, launch_us: float, pallas: bool) -> dict:
    """Predicted time of one call: Σ over launched kernels of max(memory, issue, matmul) + launch
    costs (module docstring). XLA's own GEMM kernels get the module's flops (split by their
    per-program loop work) at the bf16 peak when they issue mma, else at the f32 FMA peak."""
    thunks = parse_thunks(res["thunks"])
    bytes_by = hlo_buffer_bytes(res["hlo"])
    # The matmul work left to XLA's own GEMMs: all of it on the unfused path; t = (x/s)·A at
    # small M on the Pallas path (docs/spec/kernels.md §2).
    if not pallas:
        xla_flops = useful_flops(c)
    elif _t_in_xla(c):
        xla_flops = 2.0 * c["M"] * c["K"] * c["rank"]
    else:
        xla_flops = 0.0

    def is_xla_gemm(t):
        lib = t["kind"] not in ("kCustomKernel", "kKernel", "kCopy")
        return lib or ("gemm" in t["name"] and not t["name"].startswith("arhq"))

    def gemm_weight(t):
        st = res["kernels"].get(t["name"], {})
        return (t.get("programs") or 1) * (t.get("threads") or 1) * max(st.get("loop_instr", 1), 1)

    gemm_total = sum(gemm_weight(t) for t in thunks if is_xla_gemm(t)) or 1.0
    kernels, total = [], 0.0
    for t in thunks:
        name = t["name"]
        st = res["kernels"].get(name, {})
        byts = bytes_by.get(name, 0)
        t_mem = byts / tgt["hbm_Bps"]
        t_issue = t_mma = 0.0
        instr = None
        ours = name.startswith("arhq")
        uses_tc = st.get("mma", 0) + st.get("wgmma", 0) > 0
        if "programs" in t and st:
            trip = k_trip(name, c, tiles) if ours else 1  # XLA's loops: counted once
            per_thread = st["instr_static"] + st["loop_instr"] * (trip - 1)
            instr = per_thread * t["threads"] * t["programs"]
            active = min(t["programs"], tgt["sms"])
            t_issue = instr / (active * ISSUE_PER_SM_CYCLE * tgt["clock_hz"])
        if ours and uses_tc:
            t_mma = pallas_flops(name, c, tiles) / tgt["bf16_flops"]
        elif is_xla_gemm(t):
            rate = tgt["bf16_flops"] if uses_tc else tgt["f32_fma_flops"]
            t_mma = xla_flops * gemm_weight(t) / gemm_total / rate
        tk = max(t_mem, t_issue, t_mma)
        total += tk
        kernels.append(
            dict(name=name, kind=t["kind"], programs=t.get("programs"), threads=t.get("threads"),
                 bytes=byts, instr=instr, t_mem_us=t_mem * 1e6, t_issue_us=t_issue * 1e6,
                 t_mma_us=t_mma * 1e6, t_us=tk * 1e6)
        )  # fmt: skip
    launches = len(thunks)
    t_pred = total + launches * launch_us * 1e-6
    return dict(launches=launches, t_pred_us=t_pred * 1e6, kernels=kernels)


def compulsory_bytes(c: dict) -> float:
    """docs/spec/kernels.md §10 without the intermediates: weights, factors, s, x and y."""
    m, n, k, r = c["M"], c["N"], c["K"], c["rank"]
    xb = 2 if c["dtype"] == "bfloat16" else 4
    wb = n * k * BITS[c["fmt"].split("-")[0]] / 8
    sb = k * 4 if c["smooth"] else 0
    return wb + r * (k + n) * 2 + sb + m * k * xb + m * n * xb


def useful_flops(c: dict) -> float:
    m, n, k, r = c["M"], c["N"], c["K"], c["rank"]
    return 2.0 * m * n * k + 2.0 * m * r * (k + n)


def pallas_stats(res: dict, c: dict, tiles) -> dict:
    """Per Pallas kernel: registers, spills, mma, loop instructions per weight."""
    out = {}
    thunks = {t["name"]: t for t in parse_thunks(res["thunks"])}
    for name, st in res["kernels"].items():
        if not name.startswith("arhq"):
            continue
        th = thunks.get(name, {})
        threads = th.get("threads")
        row = dict(st, programs=th.get("programs"), threads=threads, smem=th.get("smem"))
        if "gemm" in name and threads:
            _, bn, bk = tiles
            row["instr_per_weight"] = st["loop_instr"] * threads / (bn * bk)
        if "act" in name and threads:
            row["instr_per_act"] = st["loop_instr"] * threads / (tiles[0] * tiles[2])
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def resolve_tiles(c: dict):
    if c["tiles"] is not None:
        bm, bn, bk = c["tiles"]
        return bm, bn, bk
    k_pad = -(-c["K"] // 32) * 32
    tiles = getattr(fp4_matmul, "kernel_tiles", None)
    if tiles is None:  # kernels before kernel_tiles: choose_tiles alone
        bm, bn, bk, _, _ = fp4_matmul.choose_tiles(c["M"], c["N"], k_pad)
        return bm, bn, bk
    # The tiles the call really runs with (W4A16 with x/s in three parts caps bk).
    three = c["act"] is None and not (c["dtype"] == "bfloat16" and not c["smooth"])
    bm, bn, bk, _, _ = tiles(c["M"], c["N"], k_pad, three_parts=three, w_fmt=c["fmt"])
    return bm, bn, bk


def run_config(c: dict, mesh, tgt: dict, workdir: str, launch_us: float, reuse_xla=None) -> dict:
    row = dict(id=config_id(c), **{k: v for k, v in c.items() if k != "kernel_kw"})
    args = abstract_args(c, mesh)
    tiles = resolve_tiles(c)
    row["tiles"] = list(tiles)
    row["split_k"] = resolve_split(c, tiles)
    t0 = time.time()
    try:
        res = compile_collect(pallas_fn(c), args, mesh, workdir)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        row["traceback"] = traceback.format_exc()[-2000:]
        return row
    row["compile_s"] = time.time() - t0
    row["pallas_kernels"] = pallas_stats(res, c, tiles)
    row["pallas"] = model_call(res, c, tiles, tgt, launch_us, pallas=True)
    if reuse_xla and row["id"] in reuse_xla:
        row["xla"] = reuse_xla[row["id"]]  # the unfused path does not change with the kernels
    else:
        try:
            rx = compile_collect(xla_fn(c), args, mesh, workdir)
            row["xla"] = model_call(rx, c, tiles, tgt, launch_us, pallas=False)
        except Exception as e:
            row["xla_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    ks = row["pallas_kernels"].values()
    row["spills"] = any((k["spill_stores"] or 0) + (k["spill_loads"] or 0) > 0 for k in ks)
    gemm = [k for n, k in row["pallas_kernels"].items() if "gemm" in n]
    row["mma"] = bool(gemm) and all(k["mma"] + k["wgmma"] > 0 for k in gemm)
    t_mem = compulsory_bytes(c) / tgt["hbm_Bps"] * 1e6
    t_comp = useful_flops(c) / tgt["bf16_flops"] * 1e6
    tp = row["pallas"]["t_pred_us"]
    row["roofline_mem_us"] = t_mem
    row["roofline_comp_us"] = t_comp
    row["frac_mem_roofline"] = t_mem / tp
    row["frac_bf16_peak"] = t_comp / tp
    if "xla" in row:
        row["speedup_vs_xla"] = row["xla"]["t_pred_us"] / tp
    return row


def summarize(rows: list[dict]) -> dict:
    """The JSON summary. ``decode_roofline_min`` / ``_median`` are over the *served* Llama-3-8B
    projections (qkv, o, gate_up, down at M = 1 and 16, both formats, W4A4 and W4A16: what a
    serving engine launches, docs/spec/kernels.md §11); the ``_unfused`` keys keep the same
    statistics over the per-projection rows (q/o, k/v, gate/up, down as separate weights)."""
    ok = [r for r in rows if "error" not in r]

    def decode(group):
        return [
            r["frac_mem_roofline"] for r in ok
            if r["group"] == group and r["model"] == "llama3-8b" and r["M"] in (1, 16)
        ]  # fmt: skip

    def rnd(v):
        return round(v, 4) if v is not None else None

    dec, unf = decode("served"), decode("bench")
    pre = [
        r["speedup_vs_xla"] for r in ok
        if r["group"] == "bench" and r["M"] >= 128 and "speedup_vs_xla" in r
    ]  # fmt: skip
    return dict(
        configs=len(rows),
        errors=len(rows) - len(ok),
        spill_configs=sum(r["spills"] for r in ok),
        no_mma_configs=sum(not r["mma"] for r in ok),
        decode_roofline_min=rnd(min(dec)) if dec else None,
        decode_roofline_median=rnd(statistics.median(dec)) if dec else None,
        prefill_vs_xla_min=rnd(min(pre)) if pre else None,
        decode_roofline_min_unfused=rnd(min(unf)) if unf else None,
        decode_roofline_median_unfused=rnd(statistics.median(unf)) if unf else None,
    )


def markdown(data: dict) -> str:
    s = data["summary"]
    lines = [
        f"# Deviceless compile for {data['target']['name']} (jax {data['jax']}, ptxas "
        f"{data.get('ptxas', '?')})",
        "",
        "Static model (benchmarks/gpu_aot.py, docs/spec/kernels.md §11); nothing was run on a GPU.",
        f"Launch cost {data['launch_us']} µs per kernel; HBM {data['target']['hbm_Bps'] / 1e12} "
        f"TB/s; bf16 peak {data['target']['bf16_flops'] / 1e12:.0f} TFLOP/s.",
        "",
        "Rows `served:…` are Llama-3-8B's projections as vLLM serves them: q/k/v fused into one",
        "qkv_proj (N = 4096 + 2·1024) and gate/up into one gate_up_proj (N = 2·14336), with o and",
        "down single; bf16 x without smoothing and, for nvfp4 W4A4, the static activation scale of",
        "the compressed-tensors checkpoint. The summary's `decode_roofline_min/median` are over",
        "these; the other rows are the per-projection (unfused) weights with smoothing and a",
        "dynamic nvfp4 activation scale (`*_unfused` in the summary).",
        "",
        *served_table(data["rows"]),
        "| config | tiles | K1 regs/spill B | K2 regs/spill B | mma | instr/weight | launches | "
        "pred µs | XLA µs | mem roofline | bf16 peak | vs XLA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['id']} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        pk = r["pallas_kernels"]
        k1 = next((v for n, v in pk.items() if "act" in n), None)
        k2 = next((v for n, v in pk.items() if "gemm" in n), None)

        def regs(k):
            if not k:
                return "-"
            return f"{k['registers']}/{(k['spill_stores'] or 0) + (k['spill_loads'] or 0)}"

        ipw = f"{k2['instr_per_weight']:.1f}" if k2 and "instr_per_weight" in k2 else "-"
        xla = r.get("xla", {}).get("t_pred_us")
        lines.append(
            f"| {r['id']} | {'x'.join(map(str, r['tiles']))} | {regs(k1)} | {regs(k2)} | "
            f"{'yes' if r['mma'] else 'NO'} | {ipw} | {r['pallas']['launches']} | "
            f"{r['pallas']['t_pred_us']:.1f} | {'-' if xla is None else f'{xla:.1f}'} | "
            f"{r['frac_mem_roofline']:.2f} | {r['frac_bf16_peak']:.2f} | "
            f"{r.get('speedup_vs_xla', float('nan')):.2f} |"
        )
    lines += ["", "Summary: `" + json.dumps(s) + "`", ""]
    return "\n".join(lines)


def served_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per served projection and mode, the decode fraction of the memory roofline
    (min over M = 1, 16), K2 PTX instructions per weight and launches."""
    by: dict = {}
    for r in rows:
        if r.get("group") != "served" or "error" in r:
            continue
        mode = "W4A16" if r["act"] is None else "W4A4"
        by.setdefault((r["proj"], f"{r['fmt']} {mode}"), []).append(r)
    if not by:
        return []
    out = [
        "| served projection | N×K | format | K2 instr/weight | launches | mem roofline "
        "(M=1, M=16) |",
        "|---|---|---|---|---|---|",
    ]
    for (proj, mode), rs in by.items():
        rs = sorted(rs, key=lambda r: r["M"])
        ipw = [v.get("instr_per_weight") for r in rs for n, v in r["pallas_kernels"].items()
               if "gemm" in n and v.get("instr_per_weight")]  # fmt: skip
        out.append(
            f"| {proj} | {rs[0]['N']}×{rs[0]['K']} | {mode} | "
            f"{max(ipw):.1f} | {', '.join(str(r['pallas']['launches']) for r in rs)} | "
            f"{', '.join(format(r['frac_mem_roofline'], '.2f') for r in rs)} |"
            if ipw
            else f"| {proj} | {rs[0]['N']}×{rs[0]['K']} | {mode} | - | - | - |"
        )
    return out + [""]


def group_of(r: dict) -> str:
    mode = "W4A16" if r["act"] is None else "W4A4"
    phase = "decode M<=16" if r["M"] <= 16 else f"M={r['M']}"
    return f"{r['group']} {phase} {mode} {r['fmt']}"


def compare(before: dict, after: dict) -> str:
    """Markdown: per configuration group, medians (min for the roofline fraction) before/after."""

    def stats(rows):
        out = {}
        for r in rows:
            if "error" in r:
                continue
            out.setdefault(group_of(r), []).append(r)
        res = {}
        for g, rs in out.items():
            k2 = [v for r in rs for n, v in r["pallas_kernels"].items() if "gemm" in n]
            ipw = [k["instr_per_weight"] for k in k2 if k.get("instr_per_weight")]
            regs = [k["registers"] or 0 for r in rs for k in r["pallas_kernels"].values()]
            res[g] = dict(
                n=len(rs),
                ipw=statistics.median(ipw) if ipw else float("nan"),
                regs=max(regs) if regs else 0,
                spill=sum(r["spills"] for r in rs),
                nomma=sum(not r["mma"] for r in rs),
                launches=statistics.median(r["pallas"]["launches"] for r in rs),
                mem=min(r["frac_mem_roofline"] for r in rs),
                mem_med=statistics.median(r["frac_mem_roofline"] for r in rs),
                peak=statistics.median(r["frac_bf16_peak"] for r in rs),
                xla=min(r.get("speedup_vs_xla", float("nan")) for r in rs),
            )
        return res

    b, a = stats(before["rows"]), stats(after["rows"])
    lines = [
        "| group | configs | K2 instr/weight | max regs | spilling | no mma | launches | "
        "mem roofline min (median) | bf16 peak median | vs XLA min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted(set(b) | set(a)):
        cells = []
        for key, fmt in (("n", "{}"), ("ipw", "{:.1f}"), ("regs", "{}"), ("spill", "{}"),
                         ("nomma", "{}"), ("launches", "{:g}")):  # fmt: skip
            cells.append(" → ".join(fmt.format(d[g][key]) if g in d else "-" for d in (b, a)))
        cells.append(" → ".join(f"{d[g]['mem']:.2f} ({d[g]['mem_med']:.2f})" if g in d else "-"
                                for d in (b, a)))  # fmt: skip
        cells.append(" → ".join(f"{d[g]['peak']:.2f}" if g in d else "-" for d in (b, a)))
        cells.append(" → ".join(f"{d[g]['xla']:.2f}" if g in d else "-" for d in (b, a)))
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", f"before: `{json.dumps(before['summary'])}`", "",
              f"after: `{json.dumps(after['summary'])}`", ""]  # fmt: skip
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="h100,h200")
    p.add_argument("--target-dir", default=os.environ.get("GPU_TARGET_DIR", "/work/shared/gpu"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_aot"))
    p.add_argument("--launch-us", type=float, default=LAUNCH_US)
    p.add_argument("--quick", action="store_true", help="Llama-3-8B q/o only, M = 1 and 2048")
    p.add_argument("--only", default="", help="regular expression on the configuration id")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print a before/after "
                   "table by configuration group from two result files and exit")  # fmt: skip
    p.add_argument("--no-tests", action="store_true", help="skip the GPU tests' cases")
    p.add_argument("--reuse-xla", default="", help="take the unfused-XLA rows from <this>_<target>"
                   ".json (same launch cost) instead of compiling them again")  # fmt: skip
    args = p.parse_args(argv)
    if args.compare:
        print(compare(*[json.load(open(f)) for f in args.compare]))
        return 0
    if "PTXAS_KEEP_DIR" not in os.environ and not _ptxas_wrapped():
        print("warning: ptxas is not the gpu-aot wrapper (make gpu-aot installs it): no "
              "registers, spills or PTX will be collected", file=sys.stderr)  # fmt: skip
    if args.quick:
        configs = benchmark_configs({"llama3-8b": {"q/o": (4096, 4096)}}, (1, 2048))
    else:
        configs = (
            served_configs() + benchmark_configs() + ([] if args.no_tests else gpu_test_cases())
        )
    configs = [c for c in configs if re.search(args.only, config_id(c))]
    # The unfused-XLA and kernel compiles do not depend on the target's bandwidth, but XLA's
    # own fusion heuristics may: each target is compiled in full.
    summaries = {}
    for target in [t for t in args.targets.split(",") if t]:
        tgt = TARGETS[target]
        mesh = make_topology(target, args.target_dir)
        data = dict(
            target=dict(tgt, key=target), jax=jax.__version__, ptxas=_ptxas_version(),
            launch_us=args.launch_us, issue_per_sm_cycle=ISSUE_PER_SM_CYCLE, rows=[],
        )  # fmt: skip
        path = f"{args.out}_{target}.json"
        reuse = {}
        if args.reuse_xla and os.path.exists(f"{args.reuse_xla}_{target}.json"):
            old = json.load(open(f"{args.reuse_xla}_{target}.json"))
            if old.get("launch_us") == args.launch_us:
                reuse = {r["id"]: r["xla"] for r in old["rows"] if "xla" in r}
        workdir = tempfile.mkdtemp(prefix="gpu_aot_")
        t0 = time.time()
        for i, c in enumerate(configs):
            row = run_config(c, mesh, tgt, workdir, args.launch_us, reuse)
            data["rows"].append(row)
            data["summary"] = summarize(data["rows"])
            write_json(path, data)
            if "error" in row:
                msg = f"ERROR {row['error']}"
            else:
                msg = (f"pred {row['pallas']['t_pred_us']:.1f} µs, mem roofline "
                       f"{row['frac_mem_roofline']:.2f}, vs XLA "
                       f"{row.get('speedup_vs_xla', float('nan')):.2f}x, launches "
                       f"{row['pallas']['launches']}, spills {row['spills']}, "
                       f"mma {row['mma']}")  # fmt: skip
            print(f"[{target} {i + 1}/{len(configs)} {time.time() - t0:5.0f}s] {row['id']}: {msg}",
                  flush=True)  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)
        with open(f"{args.out}_{target}.md", "w") as f:
            f.write(markdown(data))
        summaries[target] = data["summary"]
        print(f"{target}: wrote {path} and {os.path.basename(args.out)}_{target}.md")
    s = dict(summaries.get("h100") or next(iter(summaries.values())))
    s["targets"] = {k: {kk: v[kk] for kk in ("decode_roofline_min", "prefill_vs_xla_min")}
                    for k, v in summaries.items()}  # fmt: skip
    print(json.dumps(s))
    return 0 if s["errors"] == 0 else 1


def _ptxas_wrapped() -> bool:
    try:
        import nvidia.cuda_nvcc  # noqa: PLC0415

        d = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin")
        return os.path.exists(os.path.join(d, "ptxas.real"))
    except Exception:
        return False


def _ptxas_version() -> str:
    try:
        import subprocess  # noqa: PLC0415

        import nvidia.cuda_nvcc  # noqa: PLC0415

        d = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin")
        exe = os.path.join(d, "ptxas.real" if os.path.exists(os.path.join(d, "ptxas.real"))
                           else "ptxas")  # fmt: skip
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return m.group(2) if m else out.strip().splitlines()[-1]
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
