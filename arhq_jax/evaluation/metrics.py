"""Evaluation: GPTQ-style perplexity, KL and top-1 agreement with a reference (docs/spec/methods.md
§9).

Protocol: tokenize the whole text once with the tokenizer's defaults, cut the ids into ⌊T/L⌋
non-overlapping chunks of ``seq_len`` L (the tail is dropped), and take
PPL = exp(mean next-token NLL over the L−1 predictions of every chunk). KL(p_ref ‖ q) (nats, f32
log-softmax) and top-1 agreement are averaged over exactly the same positions.

The forward is pluggable: ``evaluate`` takes either ``(params, cfg)`` or a ``logits_fn(ids[B, L]
int32) -> logits[B, L, V]``, so float and quantized models run through the same code.

The default corpus is the standard library's ``pydoc_data.topics`` (offline, deterministic); its
first 60 % of tokens are for calibration and the rest for evaluation (``split_tokens``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from arhq_jax.models.transformer import forward

LogitsFn = Callable[[jax.Array], jax.Array]


def pydoc_corpus() -> str:
    """The values of ``pydoc_data.topics.topics``, in sorted key order, joined with "\\n\\n"."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text_tokens(tokenizer, text_file: str | Path | None = None) -> np.ndarray:
    """Tokenize a whole text once with the tokenizer's defaults -> int32 ``[T]``.

    ``text_file`` None means the pydoc corpus. (SmolLM2's tokenizer adds no BOS.)
    """
    if text_file is None:
        text = pydoc_corpus()
    else:
        path = Path(text_file)
        if path.is_dir():
            raise IsADirectoryError(f"text file {path} is a directory")
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"text file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                f"{e.start})"
            ) from None
    if not text.strip():
        raise ValueError(
            f"text file {text_file} is empty or blank" if text_file else "empty corpus"
        )
    ids = tokenizer(text)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def split_tokens(ids, calib_fraction: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint split: the first ``calib_fraction`` of the tokens calibrate, the rest evaluate."""
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    n = int(len(ids) * calib_fraction)
    return ids[:n], ids[n:]


def make_chunks(ids, seq_len: int, max_chunks: int | None = None) -> np.ndarray:
    """⌊T/L⌋ non-overlapping chunks ``[n, L]`` int32, tail dropped, at most ``max_chunks``."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"text too short: {len(ids)} tokens, one chunk of seq_len={seq_len} needs {seq_len}"
        )
    if max_chunks is not None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        n = min(n, max_chunks)
    return ids[: n * seq_len].reshape(n, seq_len).astype(np.int32)


@jax.jit
def _nll_rows(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Sum of next-token NLL per row ``[B]`` over the L−1 predictions (f32 log-softmax)."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = ids[:, 1:, None]
    return -jnp.take_along_axis(lp, tgt, axis=-1)[..., 0].sum(axis=-1)


@jax.jit
def _ref_rows(logits: jax.Array, ref_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row ``[B]``: sum over positions of KL(p_ref ‖ q) in nats, and top-1 agreement count."""
    lq = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    lp = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), axis=-1)
    # p·(log p − log q) with p = exp(log p); where p underflows to 0 the term is exactly 0.
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    agree = jnp.argmax(lq, axis=-1) == jnp.argmax(lp, axis=-1)
    return kl.sum(axis=-1), agree.sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """``ppl`` = exp(``nll``); ``kl`` (nats/token) and ``top1`` (fraction): None without a ref."""

    ppl: float
    nll: float
    n_chunks: int
    n_predictions: int
    seq_len: int
    kl: float | None = None
    top1: float | None = None


def jitted_forward():
    """The model forward ``(params, cfg, ids[B, L]) -> logits[B, L, V] f32``, jit-compiled with
    ``cfg`` static (params are an argument, not a closure, so they are not baked into the HLO)."""

    return forward  # already jit-compiled inside, cfg static


def model_logits_fn(params, cfg) -> LogitsFn:
    """``ids[B, L] -> logits[B, L, V] f32`` through the (jit-compiled) model forward."""
    fwd = jitted_forward()
    return lambda ids: fwd(params, cfg, ids)


def _as_logits_fn(model, cfg) -> LogitsFn:
    if callable(model) and not hasattr(model, "layers"):
        return model
    if cfg is None:
        raise ValueError("evaluate: params given without a ModelConfig (pass cfg or a logits_fn)")
    return model_logits_fn(model, cfg)


def score_chunks(
    chunks: np.ndarray,
    fns: dict,
    ref_fn: LogitsFn | None = None,
    *,
    batch_size: int,
    place=jnp.asarray,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, np.ndarray]:
    """The one evaluation loop: f64 ``[Σ NLL, Σ KL(p_ref‖q), Σ top-1 agreement]`` per name.

    ``fns`` maps a name to a ``logits_fn(ids[B, L]) -> logits[B, L, V]``, or to None for the
    reference itself (its KL is 0). ``chunks`` ``[n, L]`` go in batches of ``batch_size`` rows
    (``place`` puts a batch on the devices, e.g. sharded); the last batch is padded with copies
    of its last chunk to keep one compiled shape, and padding rows are not counted. The
    reference logits of a batch are computed once, for every model. KL and agreement are 0
    without ``ref_fn``.
    """
    n = len(chunks)
    sums = {k: np.zeros(3) for k in fns}
    with tqdm(total=n, desc=desc, unit="chunk", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = chunks[start : start + batch_size]
            real = len(batch)
            if real < batch_size:
                pad = np.repeat(batch[-1:], batch_size - real, axis=0)
                batch = np.concatenate([batch, pad])
            ids = place(batch)
            ref_logits = None if ref_fn is None else ref_fn(ids)
            for name, fn in fns.items():
                logits = ref_logits if fn is None else fn(ids)
                if logits.shape[:2] != ids.shape:
                    raise ValueError(f"logits_fn returned shape {logits.shape} for ids {ids.shape}")
                sums[name][0] += float(np.asarray(_nll_rows(logits, ids), np.float64)[:real].sum())
                if ref_logits is not None:
                    kl, agree = _ref_rows(logits, ref_logits)
                    sums[name][1] += float(np.asarray(kl, np.float64)[:real].sum())
                    sums[name][2] += int(np.asarray(agree)[:real].sum())
            bar.update(real)
    return sums


def evaluate(
    model,
    cfg,
    eval_ids,
    *,
    seq_len: int = 512,
    max_chunks: int | None = None,
    ref_params=None,
    ref_logits_fn: LogitsFn | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of ``model`` on ``eval_ids`` and, given a reference, KL and top-1 agreement.

    Args:
      model: ``Params`` (then ``cfg`` is its ``ModelConfig``) or a ``logits_fn(ids[B, L]) ->
        logits[B, L, V]`` (then ``cfg`` is ignored).
      eval_ids: int ``[T]``; cut into ⌊T/seq_len⌋ chunks (at most ``max_chunks``).
      ref_params / ref_logits_fn: the reference (unquantized) model; ``ref_params`` uses ``cfg``.
      batch_size: chunks per forward call; the last batch is padded (with its last chunk) to
        keep one compiled shape, and the padding rows are not counted.
    """
    fn = _as_logits_fn(model, cfg)
    if ref_params is not None and ref_logits_fn is not None:
        raise ValueError("give ref_params or ref_logits_fn, not both")
    ref_fn = ref_logits_fn
    if ref_params is not None:
        ref_fn = _as_logits_fn(ref_params, cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    chunks = make_chunks(eval_ids, seq_len, max_chunks)
    vocab = getattr(cfg, "vocab_size", None)
    if chunks.min() < 0 or (vocab is not None and chunks.max() >= vocab):
        raise ValueError(
            f"token ids must lie in [0, {vocab or 'V'}), got [{chunks.min()}, {chunks.max()}]"
        )
    n = len(chunks)
    sums = score_chunks(
        chunks,
        {"model": fn},
        ref_fn,
        batch_size=min(batch_size, n),
        progress=progress,
        desc=f"eval (L={seq_len})",
    )
    nll_sum, kl_sum, agree_sum = sums["model"]
    n_pred = n * (seq_len - 1)
    nll = nll_sum / n_pred
    ppl = math.exp(nll) if nll < 709.0 else math.inf  # exp overflows past 709
    if not math.isfinite(ppl):
        raise ValueError(
            f"perplexity is {'NaN' if math.isnan(nll) else 'infinite'} (non-finite logits: "
            "corrupted weights or config?); no result"
        )
    if ref_fn is None:
        return EvalResult(ppl, nll, n, n_pred, seq_len)
    return EvalResult(ppl, nll, n, n_pred, seq_len, kl=kl_sum / n_pred, top1=agree_sum / n_pred)


def perplexity(model, cfg, eval_ids, **kw) -> float:
    """Just the perplexity of ``evaluate``."""
    return evaluate(model, cfg, eval_ids, **kw).ppl
