"""sha256 digests of every quantized array of a fixed set of recipes (a refactor's bit-identity
check).

Quantizes SmolLM2-135M (or the tiny random Llama of the tests, ``--tiny``) with each recipe of
``RECIPES`` on the first ``--calib-tokens`` pydoc calibration tokens and prints, per recipe, the
number of leaves of the quantized ``Params`` and one sha256 over the per-leaf digests (each leaf:
dtype, shape and raw bytes, in ``jax.tree_util.tree_leaves`` order). ``--out FILE`` also writes
every per-leaf digest as JSON. Run it on the code before and after a change that must not move a
bit; the two outputs must be identical.

    PYTHONPATH=. python benchmarks/recipe_digests.py --calib-tokens 4096 --out before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

# name → QuantConfig keyword arguments (the same construction before and after a refactor).
RECIPES = {
    "rtn": {"method": "rtn"},
    "svdquant-r32": {"method": "svdquant", "rank": 32},
    "arhq-r32-raw": {"method": "arhq", "rank": 32},
    "arhq-r32-smooth": {"method": "arhq", "rank": 32, "setting": "smooth"},
    "gptq": {"method": "gptq"},
    "awq": {"method": "awq"},
    "serq": {"method": "serq"},
    "resq": {"method": "resq"},
}

# Extra recipes of the tiny-model regression test (every method, and the option paths).
TINY_RECIPES = {
    **RECIPES,
    "serq": {"method": "serq", "rank": 16},  # the tiny model's inputs are 64 wide
    "svdquant-r8-gptq-int4": {
        "method": "svdquant",
        "rank": 8,
        "w_fmt": "int4",
        "act_fmt": None,
        "residual_quant": "gptq",
    },
    "gptq-act-order-g32": {"method": "gptq", "group_size": 32, "act_order": True},
    "smoothquant": {"method": "smoothquant", "alpha": 0.6},
    "awq-dh": {"method": "awq-dh"},
    "serq-int4": {"method": "serq", "w_fmt": "int4", "act_fmt": "int8", "rank": 16},
    "arhq-r8-mxfp4-dyn-seq": {
        "method": "arhq",
        "rank": 8,
        "w_fmt": "mxfp4",
        "act_fmt": "mxfp4",
        "sequential": True,
    },
}


def leaf_digest(x) -> str:
    """sha256 of one array: its dtype name, shape and C-order bytes."""
    a = np.ascontiguousarray(np.asarray(x))
    h = hashlib.sha256()
    h.update(f"{a.dtype.name}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def params_digests(params) -> list[str]:
    """The per-leaf digests of a pytree, in leaf order."""
    return [leaf_digest(x) for x in jax.tree_util.tree_leaves(params)]


def combined(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def recipe_digests(params, cfg, ids, recipes: dict, *, batch_size: int = 8) -> dict:
    """{recipe name: per-leaf digests of its quantized params}."""
    from arhq_jax.run.config import QuantConfig
    from arhq_jax.run.quantize import quantize_model

    out = {}
    for name, kw in recipes.items():
        res = quantize_model(
            params, cfg, ids, QuantConfig(**kw), batch_size=batch_size, progress=False
        )
        out[name] = params_digests(res.params)
    return out


def _tiny():
    sys.path.insert(1, str(ROOT / "tests"))
    from _tiny import CFG

    from arhq_jax.models.params import random_params

    params = random_params(CFG, jax.random.key(0), std=0.08)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)
    return params, CFG, ids


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random Llama")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="recipe names (default: all)")
    ap.add_argument("--out", help="write every per-leaf digest as JSON")
    args = ap.parse_args(argv)
    if args.tiny:
        params, cfg, ids = _tiny()
        recipes = TINY_RECIPES
    else:
        from arhq_jax.evaluation.pipeline import calibration_ids, load_corpus
        from converters import load_model

        m = load_model("smollm2")
        params, cfg = m.params, m.cfg
        corpus = load_corpus(m.tokenizer)
        ids = calibration_ids(corpus.calib, args.calib_tokens, args.seq_len)
        recipes = RECIPES
    if args.only:
        recipes = {k: recipes[k] for k in args.only}
    result = {}
    for name in recipes:
        d = recipe_digests(params, cfg, ids, {name: recipes[name]})[name]
        result[name] = d
        print(f"{name:24s} {len(d):5d} leaves  {combined(d)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=0)


if __name__ == "__main__":
    main()
