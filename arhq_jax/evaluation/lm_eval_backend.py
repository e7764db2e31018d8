"""The lm-evaluation-harness backend ``arhq-jax``: float or quantized models, XLA or Pallas path.

    lm_eval --model arhq-jax --model_args model=smollm2,quantized=DIR,batch_size=8 --tasks …

needs ``pip install arhq-jax[eval]``. lm-eval 0.4.x has no plugin discovery for external models
(its ``--include_path`` adds tasks only), so the name is registered two ways: ``import arhq_jax``
registers a lazy placeholder in lm-eval's model registry when lm-eval is installed (so
``lm_eval.simple_evaluate(model="arhq-jax", …)`` works in any script that imports arhq_jax), and
``python -m arhq_jax.evaluation.lm_eval_backend <lm_eval arguments>`` is lm-eval's own command
line with the backend registered first (bad ``--model_args`` are one line, exit status 2).
``arhq-jax lm-eval`` is the shorter shell (arhq_jax/cli/main.py).

The request semantics are lm-eval's ``hf`` backend's (tokenization and the split of context and
continuation by ``TemplateLM``, left truncation to ``max_length``, the rolling windows, stop
sequences plus EOS, ``max_gen_toks`` default 256), so the numbers are comparable with it:

* ``loglikelihood``: requests sorted by length, batched, right-padded to a bucketed length
  (causal attention: padding never changes the scores of real tokens) and to a full batch (one
  compiled shape per bucket); the log-softmax in f32 and the gathering run inside ``jit``.
* ``loglikelihood_rolling``: lm-eval's disjoint windows of ``max_length`` (first one conditioned
  on the prefix token), scored through the same batched path.
* ``generate_until``: left-padded batches, one prefill into the KV cache
  (arhq_jax.models.generate), then one-token decode steps until every sequence has emitted EOS,
  contains a stop sequence, or has ``max_gen_toks`` tokens; greedy unless ``do_sample``.

Batch invariance: a W4A4 model whose activation quantizer uses the dynamic per-tensor scale
(``act_scale`` None) quantizes a whole batch with one scale, so its per-request numbers depend
slightly on the batch they fall in; ``batch_size=1`` makes them batch-invariant. Float and
weight-only models are batch-invariant up to f32 summation order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.linears.quantized import KERNELS, with_kernel
from arhq_jax.models import generate as gen
from arhq_jax.models import transformer
from converters import load_model

NAME = "arhq-jax"
# f32 logits elements of one forward (2 GiB): long contexts get fewer rows than batch_size
LOGITS_BUDGET = 2**29
# Generation pads every batch to batch_size (ids, mask, KV cache): a sane bound, checked first.
MAX_BATCH = 4096
MODEL_ARGS = (
    "model",
    "quantized",
    "kernel",
    "batch_size",
    "max_length",
    "max_gen_toks",
    "add_bos_token",
    "device",
    "max_batch_size",
    "allow_other_source",
)
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _int_arg(name: str, v, lo: int, hi: int | None = None) -> int:
    """``v`` (an int, or its decimal string) as an int in [lo, hi]; ValueError naming ``name``."""
    ok = isinstance(v, int) and not isinstance(v, bool)
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        v, ok = int(v), True
    if not ok:
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def _bool_arg(name: str, v, default: bool | None) -> bool | None:
    if v is None or isinstance(v, bool):
        return default if v is None else v
    if str(v).lower() in _TRUE:
        return True
    if str(v).lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {v!r}")


def check_model_args(args: dict) -> dict:
    """The backend's arguments (``--model_args`` and lm-eval's own flags) checked and typed, with
    a one-line ValueError naming the first bad one: unknown keys, wrong types, out-of-range
    values. Runs before any model loads."""
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(
            f"unknown --model_args key(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(MODEL_ARGS)}"
        )
    a = dict(args)
    for k in ("model", "quantized", "device"):
        v = a.get(k)
        if v is not None and not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ValueError(f"{k} must be a string, got {v!r}")
        if v is not None:
            a[k] = str(v)
    if "model" in a and not a["model"]:
        raise ValueError("model must not be empty")
    kernel = a.get("kernel", "xla")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; supported: {', '.join(KERNELS)}")
    bs = a.get("batch_size", 8)
    a["batch_size"] = (
        8
        if isinstance(bs, str) and bs.startswith("auto")
        else _int_arg("batch_size", bs, 1, MAX_BATCH)
    )
    if a.get("max_length") is not None:
        a["max_length"] = _int_arg("max_length", a["max_length"], 2)
    a["max_gen_toks"] = _int_arg("max_gen_toks", a.get("max_gen_toks", 256), 1)
    if a.get("max_batch_size") is not None:
        a["max_batch_size"] = _int_arg("max_batch_size", a["max_batch_size"], 1)
    a["add_bos_token"] = _bool_arg("add_bos_token", a.get("add_bos_token"), None)
    a["allow_other_source"] = _bool_arg("allow_other_source", a.get("allow_other_source"), False)
    return a


def parse_model_args(text: str) -> dict:
    """``key=value,key=value`` (lm-eval's ``--model_args``) → dict, strictly: every item has
    a ``=`` and a non-empty key, no key twice; values typed as lm-eval types them."""
    out: dict = {}
    for item in (x for x in text.split(",") if x.strip()):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--model_args: expected key=value, got {item.strip()!r}")
        if key in out:
            raise ValueError(f"--model_args: {key!r} given twice")
        out[key] = lm_utils.handle_arg_string(value)
    return out


def bucket_length(n: int, max_len: int) -> int:
    """Padded length for ``n`` tokens: 16·2^k up to 256, then multiples of 256, capped at
    ``max_len`` (few compiled shapes, at most 2× padding for short inputs)."""
    if n <= 256:
        b = max(16, 1 << (max(n, 1) - 1).bit_length())
    else:
        b = -(-n // 256) * 256
    return max(n, min(b, max_len))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_scores(params, cfg, ids, targets):
    """``ids [B, L]`` → per-position log p(target) ``[B, L]`` f32 and greedy match ``[B, L]``."""
    logits = transformer.forward(params, cfg, ids).astype(jnp.float32)
    # log_softmax gathered at the targets, without a second [B, L, V] array
    lse = jax.nn.logsumexp(logits, axis=-1)
    tok = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    return tok, jnp.argmax(logits, axis=-1) == targets


class ArhqJaxLM(TemplateLM):
    """An lm-eval ``LM`` over an arhq-jax model (``Params`` float or quantized, any linear).

    Args (all also as ``--model_args`` strings):
      model: what ``converters.load_model`` takes ("smollm2", a HF dir, a .gguf, an orbax dir).
      quantized: a quantized checkpoint directory (``arhq_jax.checkpoint.store``) of that model.
      kernel: "xla" or "pallas" (the Pallas kernels; interpret mode without a GPU).
      batch_size: requests per forward (``"auto"`` means 8); the last batch is padded.
      max_length: context window in tokens (default: the model's max_position_embeddings).
      max_gen_toks: default generation budget when a task sets none (256, as ``hf``).
      add_bos_token: force the tokenizer's special tokens on/off (default: its own setting).
      device, max_batch_size: accepted for lm-eval's CLI and ignored (jax places the arrays).
      allow_other_source: use a checkpoint whose recorded source model differs from ``model``.
    """

    def __init__(
        self,
        model: str = "smollm2",
        quantized: str | None = None,
        kernel: str = "xla",
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
        allow_other_source: bool | str = False,
        *,
        loaded=None,
    ):
        super().__init__()
        a = check_model_args(
            dict(
                model=model,
                quantized=quantized,
                kernel=kernel,
                batch_size=batch_size,
                max_length=max_length,
                max_gen_toks=max_gen_toks,
                add_bos_token=add_bos_token,
                device=device,
                max_batch_size=max_batch_size,
                allow_other_source=allow_other_source,
            )
        )  # before the model loads
        if loaded is None:
            loaded = load_for_eval(a["model"], a["quantized"], kernel, a["allow_other_source"])
        params, cfg, tokenizer = loaded
        if tokenizer is None:
            raise ValueError(f"model {model!r} has no tokenizer; lm-eval needs one")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.model_name, self.quantized = str(model), quantized
        self.kernel = kernel
        self._batch_size = a["batch_size"]
        self._max_length = a["max_length"] or int(cfg.max_position_embeddings)
        self._max_gen_toks = a["max_gen_toks"]
        self.add_bos_token = a["add_bos_token"]

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``--model_args`` win over lm-eval's own flags (its ``--batch_size`` defaults to 1 and
        would otherwise collide with ``batch_size=`` in the model args)."""
        check_model_args(arg_dict)  # unknown keys: a named error, not a TypeError
        extra = {
            k: v for k, v in (additional_config or {}).items() if v is not None and k in MODEL_ARGS
        }
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = parse_model_args(arg_string) if arg_string else {}
        return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def from_params(cls, params, cfg, tokenizer, **kwargs) -> ArhqJaxLM:
        """A backend over in-memory ``params`` (float or quantized), its config and tokenizer."""
        return cls(loaded=(params, cfg, tokenizer), **kwargs)

    # ------------------------------------------------------------------ lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as ``hf``: BOS when the tokenizer has one, else EOS
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or self.model_name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos is not None and string.startswith(bos):  # BOS already in the text
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def rows_per_call(self, width: int) -> int:
        """Rows of one forward at ``width`` tokens: ``batch_size``, fewer when the f32 logits
        ``[rows, width, V]`` would pass ``LOGITS_BUDGET`` elements (long contexts), at least 1."""
        return max(1, min(self.batch_size, LOGITS_BUDGET // (width * self.cfg.vocab_size)))

    def _seq(self, req) -> tuple[list[int], int]:
        """(context + continuation left-truncated to ``max_length + 1``, continuation length)."""
        _, ctx, cont = req
        if not ctx or not cont:
            raise ValueError("loglikelihood: empty context or continuation tokens")
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens > max_length {self.max_length}")
        return (list(ctx) + list(cont))[-(self.max_length + 1) :], len(cont)  # as ``hf``

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``[(key, context_ids, continuation_ids)]`` → ``[(Σ log p(continuation), is_greedy)]``."""
        seqs = [self._seq(r) for r in requests]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # longest first
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        start = 0
        while start < len(order):
            width = bucket_length(len(seqs[order[start]][0]) - 1, self.max_length)
            n_rows = self.rows_per_call(width)
            idx = order[start : start + n_rows]
            start += len(idx)
            ids = np.zeros((n_rows, width), np.int32)
            tgt = np.zeros((n_rows, width), np.int32)
            for r, i in enumerate(idx):
                seq = seqs[i][0]
                ids[r, : len(seq) - 1] = seq[:-1]
                tgt[r, : len(seq) - 1] = seq[1:]
            ids[len(idx) :] = ids[len(idx) - 1]  # pad the batch with its last row
            tgt[len(idx) :] = tgt[len(idx) - 1]
            lp, greedy = _token_scores(self.params, self.cfg, jnp.asarray(ids), jnp.asarray(tgt))
            lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
            for r, i in enumerate(idx):
                (seq, n), end = seqs[i], len(seqs[i][0]) - 1
                res = (float(lp[r, end - n : end].sum()), bool(greedy[r, end - n : end].all()))
                out[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole string, over ``hf``'s disjoint windows of ``max_length``."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores, strict=True):
            totals[r] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut at the first stop sequence or EOS."""
        reord = Collator(
            [req.args for req in requests],
            sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        res = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for chunk in reord.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            outs = self._generate(list(contexts), until, max_gen, kwargs)
            for ctx, text in zip(contexts, outs, strict=True):
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), text)
            bar.update(len(contexts))
        bar.close()
        return reord.get_original(res)

    # ------------------------------------------------------------------ generation

    def _generate(self, contexts: list[str], until: list[str], max_gen: int, kw: dict):
        max_ctx = self.max_length - max_gen
        if max_ctx < 1:
            raise ValueError(
                f"max_gen_toks {max_gen} leaves no room for the context in max_length "
                f"{self.max_length}"
            )
        temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample") else 0.0
        top_k, top_p = int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0)
        key = jax.random.key(int(kw.get("seed", 0) or 0))
        # an empty context generates from the prefix token (as loglikelihood conditions on it)
        enc = [self.tok_encode(c)[-max_ctx:] or [self.prefix_token_id] for c in contexts]
        n = len(enc)
        bs = self.batch_size
        width = bucket_length(max(len(e) for e in enc), max_ctx)
        ids = np.zeros((bs, width), np.int32)
        mask = np.zeros((bs, width), bool)
        for r, e in enumerate(enc):  # left padding: every sequence ends at the same slot
            ids[r, width - len(e) :] = e
            mask[r, width - len(e) :] = True
        ids[n:], mask[n:] = ids[n - 1], mask[n - 1]
        cache = gen.init_cache(self.cfg, bs, width + max_gen)
        # prefill in chunks whose [bs, chunk, V] logits stay within LOGITS_BUDGET
        chunk = 1 << max(0, (LOGITS_BUDGET // (bs * self.cfg.vocab_size)).bit_length() - 1)
        for s in range(0, width, chunk):
            part = slice(s, s + chunk)
            logits, cache = gen.prefill(
                self.params, self.cfg, ids[:, part], cache, attn_mask=mask[:, part]
            )
        logits = logits[:, -1]
        eos = self.eot_token_id
        stops = [s for s in until if s]
        new: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        for step in range(max_gen):
            nxt = gen.sample_logits(
                logits,
                jax.random.fold_in(key, step),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
            nxt = np.asarray(nxt)
            for r in range(n):
                if done[r]:
                    continue
                tok = int(nxt[r])
                if tok == eos:
                    done[r] = True
                    continue
                new[r].append(tok)
                if stops and any(s in self.tok_decode(new[r]) for s in stops):
                    done[r] = True
            if all(done) or step == max_gen - 1:
                break
            logits, cache = gen.decode_step(self.params, self.cfg, jnp.asarray(nxt), cache)
        return [postprocess_generated_text(self.tok_decode(t), until, None) for t in new]

    def get_model_info(self) -> dict:
        return {"model": self.model_name, "quantized": self.quantized, "kernel": self.kernel}


if __name__ != "__main__":  # under `python -m`, the imported module (see main) registers
    register_model(NAME)(ArhqJaxLM)


def load_for_eval(model: str, quantized: str | None, kernel: str, allow_other_source: bool = False):
    """``(params, cfg, tokenizer)`` of ``model``, its quantized checkpoint and kernel applied."""

    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; supported: {', '.join(KERNELS)}")
    m = load_model(model)
    params = m.params
    if quantized:
        fp = None if allow_other_source else checkpoint.fingerprint(m.cfg, m.params)
        params, _, _ = checkpoint.load(quantized, expect_config=m.cfg, expect_fingerprint=fp)
    if kernel != "xla":
        params = with_kernel(params, kernel, interpret=jax.default_backend() != "gpu")
    return params, m.cfg, m.tokenizer


RESULTS_MARK = "arhq-jax lm-eval"


def check_tasks(tasks: list[str], include_path: str | None = None):
    """lm-eval's ``TaskManager`` (with ``include_path``, a directory of task YAMLs) after
    checking that it knows every name in ``tasks`` (tasks, groups, tags, or YAML files):
    ValueError naming the unknown ones. Run it before loading a model."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no lm-eval task given (--tasks a,b,...)")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"task directory not found: {include_path}")
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(tm.match_tasks(list(tasks)))
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm-eval ls tasks`"
            f"{'; ' + str(include_path) + ' was searched too' if include_path else ''})"
        )
    return tm


def evaluate_tasks(
    lm: ArhqJaxLM,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    log_samples: bool = False,
    task_manager=None,
) -> dict:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks`` (``include_path``: a directory of task
    YAMLs of your own; ``task_manager``: the one ``check_tasks`` returned, else one is made and
    the names checked). Returns lm-eval's results dict."""
    import lm_eval

    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise ValueError(f"limit must be > 0 (a count, or a fraction below 1), got {limit!r}")
    tm = task_manager if task_manager is not None else check_tasks(tasks, include_path)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tm,
        log_samples=log_samples,
    )


def results_path(checkpoint_dir, tasks: list[str]) -> Path:
    """``<parent>/<checkpoint>.lm-eval.<tasks>.json``: the results file beside a checkpoint."""
    d = Path(checkpoint_dir).absolute()
    slug = "+".join(t.replace("/", "_") for t in tasks)
    if len(slug) > 80:
        slug = f"{slug[:60]}-{hashlib.sha1(slug.encode()).hexdigest()[:10]}"
    return d.parent / f"{d.name}.lm-eval.{slug}.json"


def check_writable(path) -> None:
    """FileExistsError unless ``path`` is absent or a results file this command wrote."""
    path = Path(path)
    if not path.exists():
        return
    try:
        mark = json.loads(path.read_text(encoding="utf-8")).get("arhq_jax", {}).get("written_by")
    except (OSError, ValueError, AttributeError):
        mark = None
    if mark != RESULTS_MARK:
        raise FileExistsError(
            f"{path} exists and was not written by {RESULTS_MARK}; not overwriting"
        )


def write_results(path, results: dict, info: dict) -> Path:
    """Write lm-eval's ``results`` (plus ``info`` under ``"arhq_jax"``) as JSON, atomically
    (a temporary sibling renamed into place); never replaces a file it did not write."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path).absolute()
    check_writable(path)
    doc = {k: v for k, v in results.items() if k != "samples"}
    doc["arhq_jax"] = {**info, "written_by": RESULTS_MARK}
    text = json.dumps(doc, indent=2, default=handle_non_serializable)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _precheck(argv: list[str]) -> None:
    """With ``--model arhq-jax``: every ``--model_args`` value parsed and checked
    (``check_model_args``) before lm-eval's command line runs (and loads anything)."""
    model, margs, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--model" and i + 1 < len(argv):
            model, i = argv[i + 1], i + 2
            continue
        if a.startswith("--model="):
            model = a.split("=", 1)[1]
        elif a == "--model_args":
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                margs.append(argv[i])
                i += 1
            continue
        elif a.startswith("--model_args="):
            margs.append(a.split("=", 1)[1])
        i += 1
    if model != NAME:
        return
    merged: dict = {}
    for m in margs:
        if m.lstrip().startswith("{"):
            try:
                d = json.loads(m)
            except (ValueError, RecursionError):
                raise ValueError(f"--model_args: not a JSON object: {m[:60]!r}") from None
            if not isinstance(d, dict):
                raise ValueError(f"--model_args: not a JSON object: {m[:60]!r}")
        else:
            d = parse_model_args(m)
        merged.update(d)
    check_model_args(merged)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with ``arhq-jax`` registered (``python -m`` this module).

    Bad input to the backend (``--model_args`` keys and values, files, unknown tasks) is one
    line on stderr, ``arhq-jax lm-eval: error: ...``, and exit status 2."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]
    try:
        _precheck(argv)
        cli_evaluate()
    except (ValueError, OSError, MemoryError, RecursionError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = "; ".join(lines) or type(e).__name__
        print(f"arhq-jax lm-eval: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from arhq_jax.evaluation.lm_eval_backend import (
        main as _main,  # the registered module, not __main__
    )

    _main()
