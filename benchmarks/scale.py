"""Quantize synthetic checkpoints of real model shapes at reduced depth: memory and time per layer.

    .venv/bin/python benchmarks/scale.py --shape qwen3-4b --layers 2 --methods rtn
    .venv/bin/python benchmarks/scale.py --shape llama3-8b --layers 2,8 --max-rss-gb 20
    .venv/bin/python benchmarks/scale.py --gpu            # on a machine with a GPU: results file

Per (shape, depth) it writes a random bf16 HF checkpoint (config.json, SmolLM2's tokenizer, one
safetensors shard per decoder layer plus one for the embeddings and one for norm + lm_head,
``model.safetensors.index.json``), then runs ``arhq-jax quantize`` on it in a subprocess per
method (RTN weight-only nvfp4; ARHQ r32 W4A4 nvfp4 on ``--calib-tokens``), and prints the peak
RSS of the subprocess (polled from /proc, and ``getrusage(RUSAGE_CHILDREN)``), seconds per layer
per phase (from the CLI's ``calibration X s, decomposition Y s, packing Z s`` line) and the
projected full-depth time and memory (linear in depth, fitted over the depths run; from one depth,
per-layer figures times the full depth plus what the depth-independent parts took).

A run whose RSS passes ``--max-rss-gb`` is killed and reported as such. ``--results PATH`` (or
``--gpu``: ``benchmarks/results/<device>.json``) writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    # Qwen/Qwen3-4B config.json
    "qwen3-4b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
}
# The --tiny smoke run: SmolLM2's vocabulary (its tokenizer calibrates), small everything else.
SHAPES["tiny"] = {
    **SHAPES["qwen3-4b"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
}
COMMON = {"hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16"}
METHODS = {
    "rtn": ["--method", "rtn", "--format", "nvfp4", "--act-format", "none"],
    "arhq": ["--method", "arhq", "--rank", "32", "--format", "nvfp4", "--act-format", "nvfp4"],
}
PHASE_RE = re.compile(
    r"calibration ([\d.]+)s, decomposition ([\d.]+)s, packing ([\d.]+)s on (\d+) tokens"
)


def layer_tensors(c: dict, i: int):
    """(name, shape) of decoder layer i's tensors (HF names)."""
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    out = [
        (p + "input_layernorm.weight", (h,)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (q, h)),
        (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)),
        (p + "self_attn.o_proj.weight", (h, q)),
        (p + "mlp.gate_proj.weight", (inter, h)),
        (p + "mlp.up_proj.weight", (inter, h)),
        (p + "mlp.down_proj.weight", (h, inter)),
    ]
    if c["model_type"] == "qwen3":
        out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
    return out


def write_checkpoint(shape: str, layers: int, path: Path, seed: int = 0) -> int:
    """A random bf16 checkpoint of ``shape`` with ``layers`` decoder layers → bytes on disk.

    Weights ~ N(0, 0.02²), norms 1: random, so only memory and time mean anything."""
    import torch
    from safetensors.torch import save_file

    from converters.gguf import load_gguf_tokenizer
    from converters.registry import smollm2_gguf_path

    cfg = {**SHAPES[shape], **COMMON, "num_hidden_layers": layers}
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        shards = [[("model.embed_tokens.weight", (cfg["vocab_size"], cfg["hidden_size"]))]]
        shards += [layer_tensors(cfg, i) for i in range(layers)]
        last = [("model.norm.weight", (cfg["hidden_size"],))]
        if not cfg["tie_word_embeddings"]:
            last.append(("lm_head.weight", (cfg["vocab_size"], cfg["hidden_size"])))
        shards.append(last)
        weight_map = {}
        for k, names in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, shp in names:
                if len(shp) == 1:
                    tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
                else:
                    t = torch.randn(shp, generator=gen, dtype=torch.float32) * 0.02
                    tensors[name] = t.to(torch.bfloat16)
                weight_map[name] = fname
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        load_gguf_tokenizer(smollm2_gguf_path()).save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _tree_rss(pid: int, field: str = "VmRSS") -> int:
    """``field`` bytes (VmRSS, or VmHWM: the kernel's peak RSS since exec) of ``pid`` and its
    descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_quantize(ckpt: Path, method: str, out: Path, calib_tokens: int, max_rss: float) -> dict:
    """``arhq-jax quantize`` in a subprocess, killed above ``max_rss`` bytes → figures."""
    import resource

    cmd = [sys.executable, "-m", "arhq_jax.cli.main", "quantize", "--model", str(ckpt)]
    cmd += [*METHODS[method], "--out", str(out)]
    if method != "rtn":
        cmd += ["--calib-tokens", str(calib_tokens), "--calib-seq-len", str(min(512, calib_tokens))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    peak, hwm, killed = [0], [0], [False]

    def watch():
        while proc.poll() is None:
            rss = _tree_rss(proc.pid)
            peak[0] = max(peak[0], rss)
            hwm[0] = max(hwm[0], _tree_rss(proc.pid, "VmHWM"))
            if rss > max_rss:
                killed[0] = True
                proc.kill()
            time.sleep(0.2)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    log = proc.communicate()[0]
    th.join()
    wall = time.perf_counter() - t0
    # The largest child so far (of this whole script). It counts the forked copy of this
    # script before the exec (with the checkpoint writer's memory), so it overstates the
    # quantize process; VmHWM (polled, monotone, reset at exec) is its true peak.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    res = {"method": method, "wall_s": wall, "peak_rss_polled": peak[0], "ru_maxrss": ru}
    res["peak_rss_hwm"] = hwm[0]
    res["rc"], res["killed_over_max_rss"] = proc.returncode, killed[0]
    m = PHASE_RE.search(log)
    if m:
        res.update(
            zip(
                ("calibration_s", "decomposition_s", "packing_s"),
                map(float, m.groups()[:3]),
                strict=True,
            )
        )
        res["calib_tokens"] = int(m.group(4))
    if proc.returncode != 0:
        res["log_tail"] = log[-2000:]
    return res


def project(rows: list[dict], full: int) -> dict:
    """Linear-in-depth projection of each figure to ``full`` layers."""
    out = {}
    keys = ("wall_s", "calibration_s", "decomposition_s", "packing_s", "peak_rss_polled")
    keys += ("peak_rss_hwm",)
    for k in keys:
        pts = [(r["layers"], r[k]) for r in rows if k in r and r.get("rc") == 0]
        if not pts:
            continue
        if len({x for x, _ in pts}) >= 2:
            (x0, y0), (x1, y1) = min(pts), max(pts)
            slope = (y1 - y0) / (x1 - x0)
            out[k] = y1 + slope * (full - x1)
            out[k + "_per_layer"] = slope
        else:
            x, y = pts[0]
            per = y / x if k not in ("peak_rss_polled", "peak_rss_hwm", "wall_s") else None
            if per is not None:
                out[k] = per * full
                out[k + "_per_layer"] = per
    return out


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{d.platform}-{d.device_kind}").strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--layers", default="2,8", help="comma list of depths")
    ap.add_argument("--methods", default="rtn,arhq", help=f"comma list of {sorted(METHODS)}")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--max-rss-gb", type=float, default=12.0)
    ap.add_argument("--work-dir", default=None, help="checkpoints here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    ap.add_argument("--results", default=None, help="write the figures as JSON here")
    ap.add_argument("--gpu", action="store_true", help="require a GPU; results/<device>.json")
    ap.add_argument("--tiny", action="store_true", help="smoke run: --shape tiny --layers 1 ...")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.layers, args.methods, args.calib_tokens = "tiny", "1", "arhq", 128
    shapes, depths = args.shape.split(","), [int(x) for x in args.layers.split(",")]
    methods = args.methods.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    dev = device_name()
    if args.gpu and not dev.startswith(("gpu", "cuda", "rocm")):
        ap.error(f"--gpu: no GPU visible to jax (device {dev})")
    results = args.results or (
        str(ROOT / "benchmarks" / "results" / f"{dev}.json") if args.gpu else None
    )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="arhq-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, summary = [], {}
    try:
        for shape in shapes:
            for n in depths:
                ckpt = work / f"{shape}-{n}l"
                t0 = time.perf_counter()
                size = write_checkpoint(shape, n, ckpt)
                print(
                    f"{shape} {n} layers: checkpoint {size / 1e9:.2f} GB written in "
                    f"{time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
                for method in methods:
                    out = work / f"{shape}-{n}l-{method}.out"
                    r = run_quantize(ckpt, method, out, args.calib_tokens, args.max_rss_gb * 1e9)
                    r.update(shape=shape, layers=n, checkpoint_bytes=size)
                    rows.append(r)
                    shutil.rmtree(out, ignore_errors=True)
                    status = (
                        "ok"
                        if r["rc"] == 0
                        else (
                            "KILLED over --max-rss-gb"
                            if r["killed_over_max_rss"]
                            else f"rc {r['rc']}"
                        )
                    )
                    phases = ", ".join(
                        f"{k[:-2]} {r[k] / n:.1f}s/layer"
                        for k in ("calibration_s", "decomposition_s", "packing_s")
                        if k in r
                    )
                    print(
                        f"  {method}: {status}; peak RSS {r['peak_rss_polled'] / 1e9:.2f} GB "
                        f"(polled), {r['peak_rss_hwm'] / 1e9:.2f} GB (VmHWM); wall "
                        f"{r['wall_s']:.0f}s; {phases}",
                        flush=True,
                    )
                    if r["rc"] != 0 and "log_tail" in r and not r["killed_over_max_rss"]:
                        print(r["log_tail"])
                if not args.keep:
                    shutil.rmtree(ckpt, ignore_errors=True)
            full = SHAPES[shape]["num_hidden_layers"]
            for method in methods:
                sel = [r for r in rows if r["shape"] == shape and r["method"] == method]
                pr = project(sel, full)
                summary[f"{shape}/{method}"] = pr
                if pr:
                    txt = ", ".join(
                        f"{k} {v / 1e9:.1f} GB" if "rss" in k else f"{k} {v:.0f}s"
                        for k, v in pr.items()
                        if not k.endswith("_per_layer")
                    )
                    print(f"{shape} {method} projected to {full} layers: {txt}")
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if results:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        Path(results).write_text(
            json.dumps({"device": dev, "rows": rows, "projected": summary}, indent=2) + "\n"
        )
        print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
