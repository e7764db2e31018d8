"""Forward throughput: our jit-compiled forward against transformers (torch), same CPU, f32.

The model is SmolLM2-135M-Instruct from its Q4_1 GGUF (dequantized to f32). The torch side loads
the same weights, written by our converter to a temporary HF directory, with transformers'
default (sdpa) or ``--attn eager`` attention. Both run a [batch, seq_len] forward that returns
the full logits; a warm-up call (compilation for JAX) is excluded and the median of ``--repeats``
timed calls is reported.

    .venv/bin/python benchmarks/forward.py                     # batch 1, 256 tokens
    .venv/bin/python benchmarks/forward.py --batch 4 --seq-len 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import torch  # noqa: E402

from arhq_jax.models.transformer import forward  # noqa: E402
from converters import load_model  # noqa: E402
from converters.hf import save_hf_dir  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up (compiles the JAX forward)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model (bench_tiny)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq_len, args.repeats = 32, 2
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from transformers import AutoModelForCausalLM

    if args.tiny:
        from benchmarks import bench_tiny

        m = bench_tiny.tiny_model()
    else:
        m = load_model(args.model, tokenizer=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf_dir(m.cfg, m.params, os.path.join(tmp, "hf"))
        ref = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=args.attn
        ).eval()

    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.cfg.vocab_size, (args.batch, args.seq_len), dtype=np.int32)
    ids_j = jax.device_put(ids)
    ids_t = torch.as_tensor(ids, dtype=torch.long)

    def run_jax():
        forward(m.params, m.cfg, ids_j).block_until_ready()

    def run_torch():
        with torch.no_grad():
            _ = ref(ids_t).logits

    t_jax = statistics.median(_time(run_jax, args.repeats))
    t_torch = statistics.median(_time(run_torch, args.repeats))
    n = args.batch * args.seq_len
    print(
        f"{'tiny' if args.tiny else args.model} forward, f32, batch {args.batch} x "
        f"{args.seq_len} tokens, "
        f"median of {args.repeats} (warm-up excluded); CPU: {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}"
    )
    print(f"{'implementation':<32} {'time (s)':>10} {'tokens/s':>12} {'ratio':>8}")
    rows = [("arhq-jax (jit)", t_jax), (f"transformers/torch ({args.attn})", t_torch)]
    for name, t in rows:
        print(f"{name:<32} {t:>10.3f} {n / t:>12.1f} {t_torch / t:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
