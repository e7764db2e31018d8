"""The one-call Python API: ``arhq_jax.quantize(model, ...)`` and ``arhq_jax.load(dir)``.

``quantize`` is what ``arhq-jax quantize`` runs (the CLI is a thin shell over ``run_quantize``):
it checks every input before the model loads, reads the calibration sources, quantizes (disk
to disk, one layer in memory, when the model is a name or a path and ``out`` is given; in
memory otherwise) and writes the checkpoint. The same settings give the same files, byte for
byte, whichever way they arrive: keyword arguments, a recipe file (``run/recipe_file.py``) or
flags. ``load`` reads a checkpoint back; both return a ``Model`` that can ``generate`` and
``evaluate``.

    import arhq_jax
    m = arhq_jax.quantize("smollm2", preset="best-w4a4", out="ckpt/w4a4")
    m = arhq_jax.quantize("smollm2", recipe="recipe.yaml", calibration="a.txt,b.jsonl:0.3")
    m = arhq_jax.load("ckpt/w4a4")
    m.evaluate(reference="smollm2")  # {"ppl", "kl", "top1", "tokens", "float_ppl"}
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import arhq_jax.evaluation.corpora as corpora
import arhq_jax.run.recipe_file as recipe_file
from arhq_jax.checkpoint import model_card
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.evaluation.metrics import make_chunks
from arhq_jax.evaluation.pipeline import calibration_ids, evaluate_models, load_corpus
from arhq_jax.models.config import ModelConfig, Params
from arhq_jax.models.generate import generate as generate_ids
from arhq_jax.parallel import distributed
from arhq_jax.run import preflight
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model
from arhq_jax.run.stream import quantize_stream
from converters import LoadedModel, load_model
from converters.lazy import open_source
from converters.registry import _hf_tokenizer

Log = Callable[[str, str], None]  # (kind "info" | "warning", message)


@dataclasses.dataclass
class Model:
    """A model in memory: its params, config and tokenizer, with the recipe it was quantized
    with (None for a float model) and what the run did.

    Attributes:
      params, cfg, tokenizer: the model (``transformer.forward(params, cfg, ids)``).
      recipe: the ``QuantConfig`` of ``quantize``, or the recorded recipe dict of ``load``.
      out: the checkpoint directory (None when nothing was written).
      diagnostics: per-projection dicts (``quantize`` only).
      timings, calib_tokens, nbytes, source_nbytes: the run's time split, its calibration
        tokens, the checkpoint's bytes and the float model's bytes.
      resumed_from: the first layer this run quantized (> 0: a killed run was resumed).
      dtype, storage: the checkpoint's storage dtype of its float tensors, and how the source
        was stored (``checkpoint.store.SourceStorage``; None for a model given in memory).
    """

    params: Params
    cfg: ModelConfig
    tokenizer: object
    recipe: object = None
    out: Path | None = None
    diagnostics: list = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)
    calib_tokens: int = 0
    nbytes: int = 0
    source_nbytes: int = 0
    resumed_from: int = 0
    dtype: str | None = None
    storage: object = None

    def generate(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = False, **kw) -> str:
        """The continuation of ``prompt`` (greedy unless ``temperature`` etc. are given, as
        ``models.generate.generate``); ``chat`` wraps it in the tokenizer's chat template."""
        tok = self.tokenizer
        if chat:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = np.asarray([tok(prompt)["input_ids"]], np.int32)
        if ids.size == 0:
            raise ValueError("the prompt gives no tokens")
        out = generate_ids(
            self.params, self.cfg, ids, max_new_tokens, eos_token_id=self.cfg.eos_token_id, **kw
        )
        return tok.decode(np.asarray(out)[0, ids.shape[1] :], skip_special_tokens=True)

    def evaluate(
        self,
        reference=None,
        *,
        text=None,
        seq_len: int = 512,
        max_chunks: int | None = 40,
        batch_size: int = 2,
        progress: bool = False,
    ) -> dict:
        """Perplexity on ``text`` (a file; default: the pydoc evaluation part, as ``eval``);
        with ``reference`` (a float model: a name, a path or a ``Model`` / ``LoadedModel``)
        also KL and top-1 against it and its ``float_ppl``. → ``{"ppl", "tokens"[, "kl",
        "top1", "float_ppl"]}``."""
        tokens = load_corpus(self.tokenizer, None, text).eval
        n_chunks = len(make_chunks(tokens, seq_len, max_chunks)) if len(tokens) >= seq_len else 1
        kw = dict(
            seq_len=seq_len,
            max_chunks=max_chunks,
            batch_size=min(batch_size, n_chunks),
            progress=progress,
            source=str(text) if text else "the pydoc evaluation text",
        )
        if reference is None:
            r = evaluate_models({}, self.params, self.cfg, tokens, **kw)["float"]
            return {"ppl": r["ppl"], "tokens": r["tokens"]}
        ref = reference if hasattr(reference, "params") else load_model(reference)
        res = evaluate_models({"q": self.params}, ref.params, self.cfg, tokens, **kw)
        return {**res["q"], "float_ppl": res["float"]["ppl"]}


def _quiet(kind: str, message: str) -> None:
    pass


def calibration_tokens(tokenizer, recipe: dict, vocab_size: int | None, read=None) -> tuple:
    """The calibration ids ``[S, L]`` of a checked recipe and the description recorded in the
    checkpoint (``calib_source``). ``read``: ``read_calibration(recipe)``'s result."""
    n = recipe_file.run_setting(recipe, "calib_tokens")
    seq_len = recipe_file.run_setting(recipe, "calib_seq_len")
    chat = recipe_file.run_setting(recipe, "chat_template")
    spec = recipe.get("calib_dataset")
    if spec is None:  # the pydoc part or one plain text file, as before recipes
        text = recipe.get("calib_text")
        corpus = load_corpus(tokenizer, text, None)
        what = "calibration text" + (f" {text}" if text else "")
        ids = calibration_ids(corpus.calib, n, seq_len, source=what, vocab_size=vocab_size)
        return ids, corpus.source
    read = read_calibration(recipe) if read is None else read
    ids = corpora.calibration_from_sources(
        tokenizer, read, n, seq_len, chat=chat, vocab_size=vocab_size
    )
    desc = f"calib={','.join(str(s) for s, _ in read)}"
    if recipe.get("calib_field", "text") != "text":
        desc += f" field={recipe['calib_field']}"
    return ids, desc + (" chat-template" if chat else "")


def read_calibration(recipe: dict):
    """The sources of ``calib_dataset`` read (before any model: files and ``datasets``), or
    None without one; a ``calib_text`` file is checked."""
    if recipe.get("calib_text") is not None:
        corpora.check_text_file(recipe["calib_text"])
    spec = recipe.get("calib_dataset")
    if spec is None:
        if recipe_file.run_setting(recipe, "chat_template"):
            raise ValueError("--chat-template needs --calib-dataset")
        return None
    field = recipe_file.run_setting(recipe, "calib_field")
    chat = recipe_file.run_setting(recipe, "chat_template")
    return [
        (s, corpora.read_calib_documents(s, field, chat)) for s in corpora.parse_calib_sources(spec)
    ]


def run_quantize(
    model,
    recipe: dict,
    out=None,
    *,
    mesh=None,
    hidden_on_host: bool = False,
    progress: bool = True,
    log: Log = _quiet,
    check_model_extra: Callable | None = None,
    allow_long: bool = False,
    return_params: bool = True,
    tokenizer=None,
    cfg: ModelConfig | None = None,
    card: model_card.Card | None = None,
) -> Model:
    """Quantize ``model`` with a checked recipe (``recipe_file.check_recipe``) into ``out``.

    ``model``: a name (``"smollm2"``), a HF directory or ``.gguf`` path (read lazily; streamed
    disk to disk when ``out`` is given and the recipe streams), a ``Model`` /
    ``converters.LoadedModel``, or ``Params`` with ``cfg`` and ``tokenizer``. Every input is
    checked before the model loads. ``check_model_extra(cfg)``: the caller's checks once the
    config is known. ``log(kind, message)`` receives the progress lines. ``allow_long``:
    ``calib_seq_len`` beyond the model's positions is a warning, not an error.
    ``return_params=False``: a streamed run does not read its checkpoint back (the result's
    ``params`` is None). Several processes (``jax.distributed``): every one quantizes, process
    0 writes ``out``. ``card``: the ``model_card.Card`` of the model card and provenance
    (default: the recipe and a description of this call).
    """
    qcfg = recipe_file.quant_config(recipe)
    if qcfg.rotate:
        raise ValueError(
            "checkpoints of rotated recipes (--rotate) are not supported yet: the online rotation "
            "has no checkpoint encoding"
        )
    if out is not None and distributed.is_writer():
        checkpoint.check_out(out)  # refuse a foreign out before any work
    read = read_calibration(recipe)
    seq_len = recipe_file.run_setting(recipe, "calib_seq_len")
    batch_size = recipe_file.run_setting(recipe, "batch_size")

    def checks(cfg):
        qcfg.check_model(cfg)
        if check_model_extra is not None:
            check_model_extra(cfg)
        what = f"--calib-seq-len {seq_len}"
        warning = cfg.check_positions(seq_len, what, allow_long=allow_long)
        if warning:
            log("warning", warning)

    if card is None:  # a Python call: the card names the call, not a command line
        path_like = isinstance(model, (str, Path))
        card = model_card.Card(
            command=["arhq_jax.quantize", str(model) if path_like else "<a loaded model>"],
            preset=recipe.get("preset"),
            generation_config=model_card.source_generation_config(model) if path_like else None,
            out=None if out is None else str(out),
        )
    if isinstance(model, Params):
        if cfg is None or tokenizer is None:
            raise ValueError("quantize(params, ...) needs cfg= and tokenizer=")
        model = LoadedModel(cfg, model, tokenizer, "params")
    if hasattr(model, "params"):  # in memory
        return _in_memory(model, qcfg, recipe, read, out, mesh, hidden_on_host, progress, log,
                          checks, card)  # fmt: skip
    # Pre-flight, before the model loads: the config from config.json or the GGUF header (no
    # tensor decoded), the recipe against it, and the run's estimated cost.
    pre = preflight.peek_config(model, require_tokenizer=True)
    storage = checkpoint.source_storage(model)
    dtype = recipe_file.run_setting(recipe, "dtype") or storage.dtype
    qcfg = checkpoint.with_factor_dtype(qcfg, dtype)  # factors stored as the residual saw them
    streamed = out is not None and jax.process_count() == 1 and qcfg.method_impl.streams(qcfg)
    if pre is not None:
        checks(pre)
        tokens = recipe_file.run_setting(recipe, "calib_tokens")
        if tokens >= seq_len:  # else calibration_tokens names the problem
            est = preflight.estimate(
                pre,
                qcfg,
                tokens // seq_len * seq_len,
                seq_len,
                batch_size=batch_size,
                hidden_on_host=hidden_on_host,
                streamed=streamed,
            )
            log("info", est.line(pre, tokens))
    t0 = time.perf_counter()
    with open_source(model, require_tokenizer=True) as src:
        cfg = src.cfg
        log(
            "info",
            f"loaded {model} ({cfg.family}, {cfg.num_layers} layers; tensors read layer by "
            f"layer) in {time.perf_counter() - t0:.1f}s",
        )
        if pre is None:  # an orbax directory: its config comes with the load
            checks(cfg)
        ids, calib_source = calibration_tokens(src.tokenizer, recipe, cfg.vocab_size, read)
        quant = {**qcfg.to_dict(), "source_model": str(model), "calib_source": calib_source}
        source = {"model": str(model)}
        single = jax.process_count() == 1
        if out is not None and single and qcfg.method_impl.streams(qcfg):
            res = quantize_stream(
                src,
                ids,
                qcfg,
                out,
                quant=quant,
                source=source,
                batch_size=batch_size,
                mesh=mesh,
                hidden_on_host=hidden_on_host,
                progress=progress,
                card=card,
                dtype=dtype,
            )
            result = Model(
                None, cfg, src.tokenizer, qcfg, Path(out), res.projections, res.timings,
                res.calib_tokens, res.nbytes, storage.nbytes or src.nbytes(), res.resumed_from,
            )  # fmt: skip
        else:
            if single and out is not None:
                log(
                    "warning",
                    f"{qcfg.label()} reads the whole model before its layers: loaded in memory, "
                    "not streamed (a killed run starts over)",
                )
            params = src.load_params()
            loaded = LoadedModel(cfg, params, src.tokenizer, str(model))
            result = _quantize_loaded(
                loaded,
                qcfg,
                ids,
                quant,
                source,
                out,
                batch_size,
                mesh,
                hidden_on_host,
                progress,
                card,
                dtype,
            )
            result.source_nbytes = storage.nbytes or src.nbytes()
    result.storage, result.dtype = storage, dtype
    if result.params is None and return_params:  # streamed: the checkpoint is the result
        result.params = checkpoint.load(out)[0]
    return result


def _in_memory(model, qcfg, recipe, read, out, mesh, hidden_on_host, progress, log, checks,
               card=None):  # fmt: skip
    cfg = model.cfg
    checks(cfg)
    ids, calib_source = calibration_tokens(model.tokenizer, recipe, cfg.vocab_size, read)
    name = str(getattr(model, "source", "params"))
    quant = {**qcfg.to_dict(), "source_model": name, "calib_source": calib_source}
    batch_size = recipe_file.run_setting(recipe, "batch_size")
    dtype = recipe_file.run_setting(recipe, "dtype")  # None: the loaded parameters' dtype
    if dtype is not None:
        qcfg = checkpoint.with_factor_dtype(qcfg, dtype)
    res = _quantize_loaded(
        model,
        qcfg,
        ids,
        quant,
        {"model": name},
        out,
        batch_size,
        mesh,
        hidden_on_host,
        progress,
        card,
        dtype,
    )
    res.source_nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(model.params))
    return res


def _quantize_loaded(model, qcfg, ids, quant, source, out, batch_size, mesh, hidden_on_host,
                     progress, card=None, dtype=None):  # fmt: skip
    """``quantize_model`` on a loaded model, then ``checkpoint.save`` (process 0) when ``out``
    is given: the files the streamed run writes, byte for byte."""
    cfg = model.cfg
    r = quantize_model(
        model.params,
        cfg,
        ids,
        qcfg,
        batch_size=batch_size,
        mesh=mesh,
        hidden_on_host=hidden_on_host,
        progress=progress,
    )
    nbytes = 0
    if out is not None and distributed.is_writer():
        quant = {**quant, "calib_tokens": r.calib_tokens, "timings": r.timings}
        source = {**source, "fingerprint": checkpoint.fingerprint(cfg, model.params)}
        if card is not None:
            card = dataclasses.replace(card, diagnostics=r.projections)
        nbytes = checkpoint.save(
            out,
            r.params,
            cfg,
            quant=quant,
            tokenizer=model.tokenizer,
            source=source,
            card=card,
            dtype=dtype,
        )
    return Model(
        r.params, cfg, model.tokenizer, qcfg, None if out is None else Path(out), r.projections,
        r.timings, r.calib_tokens, nbytes,
    )  # fmt: skip


def quantize(
    model,
    recipe=None,
    *,
    preset: str | None = None,
    calibration=None,
    out=None,
    progress: bool = True,
    hidden_on_host: bool = False,
    cfg: ModelConfig | None = None,
    tokenizer=None,
    **settings,
) -> Model:
    """Quantize ``model`` and (with ``out``) write its checkpoint, in one call.

    Args:
      model: ``"smollm2"``, a HF model directory or a ``.gguf`` file (read layer by layer), a
        loaded model (``converters.load_model``'s result, a ``Model``), or ``Params`` with
        ``cfg=`` and ``tokenizer=``.
      recipe: a recipe file (YAML, docs/recipes.md), a dict of its keys, or a ``QuantConfig``.
      preset: a named recipe (``run.config.PRESETS``); the other settings override its fields.
      calibration: the calibration text: None (the pydoc part), a source spec as
        ``--calib-dataset`` takes it (``"wikitext2"``, ``"a.txt,b.jsonl:0.3"``), or a list of
        source specs.
      out: the checkpoint directory to write (None: quantize in memory only).
      **settings: any recipe key with underscores (``method="arhq"``, ``rank=16``,
        ``format="nvfp4"``, ``act_format="nvfp4"``, ``calib_tokens=4096``, ``ignore=[...]``).
        They override the recipe's.

    Returns:
      The quantized ``Model`` (params, cfg, tokenizer, recipe, diagnostics, timings, bytes).
      Bad input raises ValueError / OSError naming the problem, before the model loads.
    """
    base: dict = {}
    if isinstance(recipe, QuantConfig):
        base = recipe_file.check_recipe(recipe_file.resolved_recipe(recipe, {}))
        for k in ("calib_tokens", "calib_seq_len", "batch_size"):
            base.pop(k)
    elif isinstance(recipe, dict):
        base = recipe_file.check_recipe(recipe)
    elif recipe is not None:
        base = recipe_file.read_recipe(recipe)
    given = dict(settings)
    if preset is not None:
        given["preset"] = preset
    if calibration is not None:
        if isinstance(calibration, list | tuple):
            calibration = ",".join(map(str, calibration))
        given["calib_dataset"] = str(calibration)
        base.pop("calib_text", None)
    merged = {**base, **recipe_file.check_recipe(given, "quantize()")}
    if "calib_text" in given:
        merged.pop("calib_dataset", None)
    return run_quantize(
        model,
        merged,
        out,
        hidden_on_host=hidden_on_host,
        progress=progress,
        cfg=cfg,
        tokenizer=tokenizer,
    )


def load(path, model=None) -> Model:
    """A quantized checkpoint directory → ``Model`` (its tokenizer is the checkpoint's own).

    ``model``: the float source (a name, a path or a loaded model) to check the checkpoint
    against (the recorded fingerprint must match); None skips that check.
    """
    expect_cfg = fp = None
    if model is not None:
        m = model if hasattr(model, "params") else load_model(model)
        expect_cfg, fp = m.cfg, checkpoint.fingerprint(m.cfg, m.params)
    params, cfg, recipe = checkpoint.load(path, expect_config=expect_cfg, expect_fingerprint=fp)
    tok = _hf_tokenizer(Path(path))
    return Model(params, cfg, tok, recipe, Path(path))
