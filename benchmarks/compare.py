"""Every method on SmolLM2-135M in one table: native formats and NVFP4 W4A4 at matched extra bits.

    .venv/bin/python benchmarks/compare.py                      # the full table (~20 min, 2 cores)
    .venv/bin/python benchmarks/compare.py --only gptq,awq      # rows whose name starts so

Calibration: the first ``--calib-tokens`` tokens of the pydoc calibration part (60 %); evaluation:
``--max-chunks`` chunks of ``--seq-len`` from the disjoint pydoc evaluation part. Per row:
perplexity, KL and top-1 agreement against the float model (same chunks), the stored size of the
whole model (MiB) and of the seven quantized projections (bits per weight, every stored array
counted: codes, scales, zero points, factors, smoothing and permutation vectors), and the wall time
of ``quantize_model`` (calibration + decomposition + packing, compilation included).

Low-rank rows store their factors in bf16 (r·(in + out)·16 extra bits per projection). The
"≙ SERQ" and "≙ ResQ" rows give SVDQuant/ARHQ the rank whose extra bits match SERQ's compensation
matrix (r = 128 channels, MXFP4) and ResQ's 8-bit subspace (d/8 columns at 8 instead of 4 bits).

Writes ``benchmarks/results/compare.md`` and ``compare.json`` (rewritten after every row).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see arhq_jax/cli/main.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The repository root first on sys.path, never benchmarks/ itself (python puts a script's folder
# there): this folder's module names must not shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from arhq_jax.checkpoint.store import tree_nbytes  # noqa: E402
from arhq_jax.evaluation import report  # noqa: E402
from arhq_jax.evaluation.metrics import load_text_tokens  # noqa: E402
from arhq_jax.evaluation.pipeline import calibration_ids, evaluate_models, load_corpus  # noqa: E402
from arhq_jax.models.config import PROJECTIONS  # noqa: E402
from arhq_jax.numerics import formats as F  # noqa: E402
from arhq_jax.run.config import QuantConfig  # noqa: E402
from arhq_jax.run.quantize import quantize_model  # noqa: E402

FACTOR = "bfloat16"
COLUMNS = (
    ("name", "method", "s"),
    ("formats", "W / A", "s"),
    ("calib", "calib", "s"),
    ("calib_tokens", "tokens", "d"),
    ("bits", "bits/w", ".2f"),
    ("mib", "MiB", ".1f"),
    ("ppl", "ppl", ".3f"),
    ("kl", "KL", ".4f"),
    ("top1", "top-1", ".4f"),
    ("quant_s", "quantize s", ".0f"),
)
# the same measures on a second text (``--second-text``), after the pydoc ones.
SECOND_COLUMNS = (("ppl2", "ppl²", ".3f"), ("kl2", "KL²", ".4f"), ("top1_2", "top-1²", ".4f"))


def _shapes(cfg):
    return [cfg.linear_shapes()[p] for p in PROJECTIONS]


def rank_bits(cfg) -> float:
    """Extra bits per projection weight of one bf16 rank: 16·Σ(in + out)/Σ(in·out)."""
    s = _shapes(cfg)
    return 16 * sum(o + i for o, i in s) / sum(o * i for o, i in s)


def serq_extra_bits(cfg, r: int = 128) -> float:
    """SERQ (MXFP4 path): the [out, r] MXFP4 compensation matrix per projection, plus its f32
    flattening scale and int32 permutation per input channel."""
    s = _shapes(cfg)
    extra = sum(r * F.bits_per_element("mxfp4") * o + 64 * i for o, i in s)
    return extra / sum(o * i for o, i in s)


def resq_extra_bits(cfg) -> float:
    """ResQ: d/8 input columns at 8 instead of 4 bits (and a second per-row scale) in every
    projection but down_proj."""
    s = cfg.linear_shapes()
    n_hi = cfg.hidden_size // 8  # o_proj: num_heads·head_dim/8, = hidden/8 for these models
    extra = sum(s[p][0] * (4 * n_hi + 32) for p in PROJECTIONS if p != "down_proj")
    extra += 32 * s["o_proj"][1]  # o_proj's int32 input permutation
    return extra / sum(o * i for o, i in s.values())


TINY_ROWS = ("rtn", "arhq r32")  # the rows of a --tiny run


def runs(cfg) -> list[dict]:
    """The rows: name, QuantConfig arguments, and which comparison they belong to."""
    r_serq = max(1, round(serq_extra_bits(cfg) / rank_bits(cfg)))
    r_resq = max(1, round(resq_extra_bits(cfg) / rank_bits(cfg)))
    lr = {"factor_dtype": FACTOR}
    nv = {"w_fmt": "nvfp4", "act_fmt": "nvfp4"}
    return [
        # NVFP4 W4A4: the low-rank family at ARHQ's rank.
        {"name": "rtn", "kw": dict(method="rtn", **nv)},
        {"name": "svdquant r32", "kw": dict(method="svdquant", rank=32, **nv, **lr)},
        {"name": "arhq r32", "kw": dict(method="arhq", rank=32, **nv, **lr)},
        {
            "name": "arhq r32 + gptq residual",
            "kw": dict(method="arhq", rank=32, residual_quant="gptq", sequential=True, **nv, **lr),
        },
        # GPTQ: native int4 per-channel weight-only, and NVFP4 W4A4.
        {
            "name": "rtn int4 w-only",
            "kw": dict(method="rtn", w_fmt="int4", act_fmt=None, group_size=-1),
        },
        {"name": "gptq", "kw": dict(method="gptq")},
        {"name": "gptq nvfp4", "kw": dict(method="gptq", **nv)},
        # SmoothQuant: native W8A8, and NVFP4 W4A4.
        {
            "name": "rtn int8 W8A8",
            "kw": dict(
                method="rtn", w_fmt="int8", act_fmt="int8", group_size=-1, act_group_size=-1
            ),
        },
        {"name": "smoothquant", "kw": dict(method="smoothquant")},
        {"name": "smoothquant nvfp4", "kw": dict(method="smoothquant", **nv)},
        # FPRAG-AWQ: native int4-asym g128 weight-only (lm_head quantized too, as FPRAG does).
        {
            "name": "rtn int4-asym g128 w-only",
            "kw": dict(method="rtn", w_fmt="int4-asym", act_fmt=None),
        },
        {"name": "awq", "kw": dict(method="awq")},
        {"name": "awq-dh", "kw": dict(method="awq-dh")},
        {"name": "awq, lm_head float", "kw": dict(method="awq", quantize_lm_head=False)},
        # SERQ: native MXFP4 W4A4 (r = 128), its NVFP4 variant, low-rank at matched extra bits.
        {"name": "rtn mxfp4", "kw": dict(method="rtn", w_fmt="mxfp4", act_fmt="mxfp4")},
        {"name": "serq r128", "kw": dict(method="serq")},
        {"name": "serq r128 nvfp4", "kw": dict(method="serq", **nv)},
        {
            "name": f"svdquant r{r_serq} (≙ SERQ bits)",
            "kw": dict(method="svdquant", rank=r_serq, **nv, **lr),
        },
        {
            "name": f"arhq r{r_serq} (≙ SERQ bits)",
            "kw": dict(method="arhq", rank=r_serq, **nv, **lr),
        },
        # ResQ: native int4 with the top 1/8 at int8, low-rank at matched extra bits.
        {
            "name": "rtn int4 W4A4",
            "kw": dict(
                method="rtn", w_fmt="int4", act_fmt="int4", group_size=-1, act_group_size=-1
            ),
        },
        {"name": "resq", "kw": dict(method="resq")},
        {
            "name": f"svdquant r{r_resq} (≙ ResQ bits)",
            "kw": dict(method="svdquant", rank=r_resq, **nv, **lr),
        },
        {
            "name": f"arhq r{r_resq} (≙ ResQ bits)",
            "kw": dict(method="arhq", rank=r_resq, **nv, **lr),
        },
    ]


# the ingredients of the best-w4a4 preset, each alone on ARHQ r32 (raw, RTN residual,
# parallel) and each removed from the preset (its plain-ARHQ value restored); REJECTED: tried and
# left out of the preset, each alone and added to the preset. Rows "beyond…". The ablation rows
# can calibrate on fewer tokens than the run (``--ablation-tokens``: the first n of its ids).
INGREDIENTS = {
    "gptq residual": {"residual_quant": "gptq"},
    "scale search": {"mse_clip": True},
    "refine": {"refine_iters": 3},
    "sequential": {"sequential": True},
}
# An ingredient that acts only with another: its row alone on ARHQ r32 adds that one, and
# removing that one from the preset removes it too.
NEEDS = {"scale search": {"residual_quant": "gptq"}}
REJECTED = {
    "act-aware residual": {"act_aware": True},
    "refine gptq": {"refine_gptq": True},
    "act order": {"act_order": True},
    "smooth": {"setting": "smooth", "alpha_tokens": 4096},
    "rank budget": {"rank_budget": True},
    "rotate64": {"rotate": 64},
}
PLAIN = {"residual_quant": "rtn", "refine_iters": 0, "rotate": 0, "rank_budget": False,
         "sequential": False, "act_aware": False, "setting": "raw", "refine_gptq": False,
         "alpha_tokens": None, "mse_clip": False, "act_order": False}  # fmt: skip
NV = {"w_fmt": "nvfp4", "act_fmt": "nvfp4"}
# The baselines of the beyond table: the demo's rows and SVDQuant as its authors run it
# (Nunchaku / deepcompressor: per-projection α-searched smoothing, then the truncated SVD of the
# smoothed weight as a 16-bit branch, RTN 4-bit residual; α searched on the first 4096 tokens).
BEYOND_BASELINES = [
    {"name": "beyond: rtn", "kw": dict(method="rtn", **NV)},
    {"name": "beyond: svdquant r32",
     "kw": dict(method="svdquant", rank=32, **NV, factor_dtype=FACTOR)},
    {
        "name": "beyond: svdquant r32, authors' recipe (smooth)",
        "kw": dict(method="svdquant", rank=32, setting="smooth", alpha_tokens=4096, **NV,
                   factor_dtype=FACTOR),
    },
]  # fmt: skip


def _clean(kw: dict) -> dict:
    """``kw`` without the ingredients left at their default (QuantConfig refuses an option that
    has no effect in a recipe, even at its default)."""
    return {k: v for k, v in kw.items() if not (k in PLAIN and v == PLAIN[k])}


def _valid(kw: dict) -> bool:
    try:
        QuantConfig(**{k: v for k, v in _clean(kw).items() if k != "calib_tokens"})
    except ValueError:
        return False
    return True


def beyond_runs(ablation_tokens: int | None = None) -> list[dict]:
    """Row "beyond: best-w4a4 preset" on the run's calibration tokens; rows "beyond@n:" (n =
    ``ablation_tokens`` calibration tokens; without it "beyond:" on the run's) the preset, the
    baselines, ARHQ r32, the preset minus each ingredient and ARHQ r32 plus each ingredient;
    "beyond-rejected@n:" each rejected ingredient alone and added to the preset (when valid)."""
    from arhq_jax.run.config import PRESETS

    best = {**PLAIN, **PRESETS["best-w4a4"]}
    base = {**best, **PLAIN}
    tag, extra = (
        ("", {})
        if ablation_tokens is None
        else (f"@{ablation_tokens}", {"calib_tokens": ablation_tokens})
    )
    rows = [{"name": "beyond: best-w4a4 preset", "kw": best}]
    abl = (
        [] if ablation_tokens is None else [{"name": f"beyond{tag}: best-w4a4 preset", "kw": best}]
    )
    abl += [{**r, "name": r["name"].replace("beyond", f"beyond{tag}", 1)} for r in BEYOND_BASELINES]
    abl.append({"name": f"beyond{tag}: arhq r32", "kw": base})
    for k, v in INGREDIENTS.items():
        if all(best.get(x) == y for x, y in v.items()):
            drop, also = dict(v), []
            for j, need in NEEDS.items():  # what acts only with k goes with it
                if j != k and set(need) & set(v) and all(best.get(x) == y for x, y in need.items()):
                    drop.update(INGREDIENTS[j])
                    also.append(j)
            name = f"preset − {k}" + "".join(f" − {j}" for j in also)
            kw = {**best, **{x: PLAIN[x] for x in drop}}
        else:  # an ingredient the preset leaves out
            kw, name = {**best, **v}, f"preset + {k}"
        abl.append({"name": f"beyond{tag}: {name}", "kw": kw})
    for k, v in INGREDIENTS.items():
        need = NEEDS.get(k, {})
        with_ = "".join(f" (with {j})" for j, w in INGREDIENTS.items() if w.items() <= need.items())
        abl.append({"name": f"beyond{tag}: + {k}{with_}", "kw": {**base, **need, **v}})
    abl += [
        {"name": f"beyond-rejected{tag}: + {k}", "kw": {**base, **v}} for k, v in REJECTED.items()
    ]
    abl += [
        {"name": f"beyond-rejected{tag}: preset + {k}", "kw": {**best, **v}}
        for k, v in REJECTED.items()
    ]
    rows += [{**r, "kw": {**r["kw"], **extra}} for r in abl if _valid(r["kw"])]
    return [{**r, "kw": _clean(r["kw"])} for r in rows]


def projection_bits(params, cfg) -> float:
    """Stored bits per weight of the seven projections of every layer."""
    nbytes = sum(tree_nbytes(getattr(ly, p)) for ly in params.layers for p in PROJECTIONS)
    n = cfg.num_layers * sum(o * i for o, i in _shapes(cfg))
    return 8 * nbytes / n


@dataclasses.dataclass
class Bench:
    """What every row of a benchmark run shares: the float model loaded once, the calibration ids
    drawn once, the evaluation texts, and the float model's scores on them."""

    model: Any  # converters.registry.LoadedModel
    corpus: Any  # arhq_jax.evaluation.pipeline.Corpus
    calib: np.ndarray  # [n, calib_seq_len] calibration ids
    eval_kw: dict  # evaluate_models' chunking of both texts
    second: np.ndarray | None  # the second text's token ids, or None
    fp: dict  # the float model's ppl/tokens (and ppl2, kl2, top1_2, tokens2 with a second text)
    second_source: str = "second text"  # how errors name the second text

    def score(self, models: dict, progress: bool = False) -> dict:
        """``{name: ppl, kl, top1, tokens}`` on the pydoc evaluation part, with ``ppl2, kl2,
        top1_2`` on the second text when there is one."""
        m, kw = self.model, {**self.eval_kw, "progress": progress}
        out = evaluate_models(models, m.params, m.cfg, self.corpus.eval, **kw)
        if self.second is not None:
            kw2 = {**kw, "source": self.second_source}
            sc2 = evaluate_models(models, m.params, m.cfg, self.second, **kw2)
            for name in models:
                out[name].update(_second(sc2[name]))
        return out


def load_bench(args) -> Bench:
    """The model (``args.model``, or the tiny random one under ``args.tiny``, which also sets
    the tiny sizes in ``args``), the calibration ids and the float scores on the pydoc
    evaluation part and on ``args.second_text`` (if given; under ``--tiny`` its UTF-8 bytes
    are the token ids). Raises OSError/ValueError for a second text that is missing, not
    UTF-8, blank or too short for one evaluation chunk."""
    from converters import load_model

    if args.tiny:  # the tiny random model, a few chunks
        from benchmarks import bench_tiny

        m, corpus = bench_tiny.tiny_model(), bench_tiny.tiny_corpus()
        tokenizer = bench_tiny.byte_tokenizer
        args.calib_tokens, args.calib_seq_len = bench_tiny.CALIB_TOKENS, bench_tiny.SEQ_LEN
        args.seq_len, args.max_chunks = bench_tiny.SEQ_LEN, 2
    else:
        m = load_model(args.model)
        corpus, tokenizer = load_corpus(m.tokenizer), m.tokenizer
    calib = calibration_ids(corpus.calib, args.calib_tokens, args.calib_seq_len)
    eval_kw = dict(seq_len=args.seq_len, max_chunks=args.max_chunks, progress=False)
    fp = evaluate_models({}, m.params, m.cfg, corpus.eval, **eval_kw)["float"]
    second = None
    if args.second_text is not None:
        kw2 = {**eval_kw, "source": f"second text {args.second_text}"}
        second = load_text_tokens(tokenizer, args.second_text)
        fp2 = evaluate_models({}, m.params, m.cfg, second, **kw2)["float"]
        fp.update(ppl2=fp2["ppl"], kl2=0.0, top1_2=1.0, tokens2=fp2["tokens"])
    return Bench(m, corpus, calib, eval_kw, second, fp, f"second text {args.second_text}")


def _formats(q: QuantConfig) -> str:
    w = q.w_fmt
    if q.group_size is not None and F.resolve_format(q.w_fmt).is_int:
        w += f" g{q.group_size}" if q.group_size > 0 else " row"
    if q.method == "resq":
        w, a = "int4+int8 row", "int4+int8 token"
        return f"{w} / {a}"
    a = q.act_fmt or "16-bit"
    if q.act_group_size is not None:
        a += " token" if q.act_group_size == -1 else f" g{q.act_group_size}"
    return f"{w} / {a}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--only", default=None, help="comma-separated row-name prefixes")
    ap.add_argument(
        "--eval-each",
        action="store_true",
        help="score each row right after quantizing it (results survive an interrupted run; "
        "the float logits are recomputed per row)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="compare", help="results file stem (compare.md/json)")
    ap.add_argument(
        "--ablation-tokens",
        type=int,
        default=None,
        help="calibrate the beyond@n ablation rows on the first n tokens only",
    )
    ap.add_argument(
        "--second-text",
        default=None,
        help="also score every row on this UTF-8 text file (columns ppl², KL², top-1²)",
    )
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model (bench_tiny)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    try:
        bench = load_bench(args)
    except (OSError, ValueError) as e:  # second text missing, not UTF-8, blank or too short
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    m, calib, fp, score = bench.model, bench.calib, bench.fp, bench.score
    corpus, second = bench.corpus, bench.second
    fp_bits = 8 * jax.numpy.dtype(m.cfg.param_dtype).itemsize
    rows = [
        {
            "name": "float",
            "formats": m.cfg.param_dtype,
            "calib": "–",
            "calib_tokens": 0,
            "bits": fp_bits,
            "mib": tree_nbytes(m.params) / 2**20,
            **fp,
            "kl": 0.0,
            "top1": 1.0,
            "quant_s": 0.0,
        }
    ]
    print(
        f"{args.model}: loaded and float-evaluated in {time.perf_counter() - t_start:.0f}s; "
        f"float ppl {fp['ppl']:.3f} on {fp['tokens']} tokens; {calib.size} calibration tokens"
    )
    only = None if args.only is None else [s.strip() for s in args.only.split(",")]
    every = runs(m.cfg) + beyond_runs(args.ablation_tokens)
    if args.tiny and only is None:
        todo = [r for r in every if r["name"] in TINY_ROWS]
    elif only is None:
        todo = every
    else:  # in the order of the prefixes given
        todo = [r for o in only for r in every if r["name"].startswith(o)]
        todo = [r for i, r in enumerate(todo) if r not in todo[:i]]
    meta = {
        "second_text": args.second_text,
        "second_tokens": None if second is None else fp["tokens2"],
        "model": args.model,
        "calib_tokens": int(calib.size),
        "eval_tokens": fp["tokens"],
        "seq_len": args.seq_len,
        "corpus": corpus.source,
        "factor_dtype": FACTOR,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    out = Path(args.out)
    qmodels = {}
    for i, run in enumerate(todo):
        kw = dict(run["kw"])
        n_calib = kw.pop("calib_tokens", None)  # a row on fewer calibration tokens
        ids = calib if n_calib is None else calib.reshape(-1)[:n_calib].reshape(-1, calib.shape[1])
        qcfg = QuantConfig(**kw)
        print(f"[{i + 1}/{len(todo)}] {run['name']}: {qcfg.label()} ...", flush=True)
        t0 = time.perf_counter()
        res = quantize_model(m.params, m.cfg, ids, qcfg, progress=False)
        quant_s = time.perf_counter() - t0
        qmodels[run["name"]] = res.params
        row = {
            "name": run["name"],
            "formats": _formats(qcfg),
            "calib": "seq" if qcfg.sequential else "par",
            "calib_tokens": int(ids.size),
            "rank": qcfg.rank if (qcfg.uses_branch or qcfg.method == "serq") else 0,
            "bits": projection_bits(res.params, m.cfg),
            "mib": tree_nbytes(res.params) / 2**20,
            "quant_s": quant_s,
            "timings": {k: round(v, 2) for k, v in res.timings.items()},
            "config": qcfg.to_dict(),
        }
        rows.append(row)
        print(f"    {row['bits']:.2f} bits/w  {row['mib']:.1f} MiB  {quant_s:.0f}s", flush=True)
        if args.eval_each:
            row.update(score({run["name"]: res.params})[run["name"]])
            del qmodels[run["name"]]
            print(f"    ppl {row['ppl']:.3f}  KL {row['kl']:.4f}  top-1 {row['top1']:.4f}")
        _write(out, rows, meta, time.perf_counter() - t_start, args.name)
    if qmodels:  # one evaluation pass: the float logits of each chunk computed once for all
        print(f"evaluating {len(qmodels)} models ...", flush=True)
        scores = score(qmodels, progress=True)
        for row in rows[1:]:
            row.update(scores.get(row["name"], {}))
    _write(out, rows, meta, time.perf_counter() - t_start, args.name)
    print()
    print(report.text_table(rows, _columns(meta)))
    print(f"total {time.perf_counter() - t_start:.0f}s; wrote {out}/{args.name}.{{md,json}}")
    return 0


def _second(score: dict) -> dict:
    return {"ppl2": score["ppl"], "kl2": score["kl"], "top1_2": score["top1"]}


def _columns(meta) -> tuple:
    return COLUMNS + (SECOND_COLUMNS if meta.get("second_text") else ())


def _write(out: Path, rows, meta, total_s, name: str = "compare") -> None:
    meta = {**meta, "total_s": round(total_s, 1)}
    report.write_json(out / f"{name}.json", {"meta": meta, "rows": rows})
    title = (
        f"SmolLM2-135M, {meta['calib_tokens']} calibration tokens, {meta['eval_tokens']} "
        f"evaluation tokens (pydoc, disjoint); KL and top-1 against the float model"
    )
    notes = (
        "\n\nbits/w: stored bits per weight of the seven projections (codes, scales, zero points, "
        "bf16 low-rank factors, smoothing/permutation vectors). MiB: the whole model (f32 "
        "embeddings; ResQ adds an untied, rotated lm_head, AWQ a quantized one). calib: "
        "sequential (seq) or parallel (par) calibration. quantize s: wall time of "
        f"quantize_model, compilation included ({meta['devices']}).\n"
    )
    if meta.get("second_text"):
        notes += (
            f"ppl², KL², top-1²: the same measures on {meta['second_text']} "
            f"({meta['second_tokens']} predicted tokens).\n"
        )
    report.atomic_write(
        out / f"{name}.md", f"**{title}**\n\n" + report.markdown_table(rows, _columns(meta)) + notes
    )


if __name__ == "__main__":
    sys.exit(main())
