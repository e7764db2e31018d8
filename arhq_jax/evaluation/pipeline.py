"""The end-to-end job behind the CLI and the demo: tokens → calibrate/quantize → evaluate.

Thin glue over the functional core: token bookkeeping (disjoint calibration and evaluation
parts), one evaluation pass that scores several models against the same float reference (the
float logits of a chunk are computed once), and the result rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

import arhq_jax.evaluation.metrics as ev
from arhq_jax.calibration.calibrate import data_mesh, replicate, shard_batch
from arhq_jax.models.config import ModelConfig, Params


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token ids of the calibration and evaluation parts (never overlapping for the default)."""

    calib: np.ndarray  # int32 [T_c]
    eval: np.ndarray  # int32 [T_e]
    source: str


def load_corpus(tokenizer, calib_text=None, eval_text=None) -> Corpus:
    """The pydoc parts (first 60 % / rest) unless files are given.

    A given ``calib_text`` file is used whole for calibration and a given ``eval_text`` whole
    for evaluation; the missing one comes from the pydoc split.
    """
    pydoc = None
    if calib_text is None or eval_text is None:
        pydoc = ev.split_tokens(ev.load_text_tokens(tokenizer, None))
    calib = pydoc[0] if calib_text is None else ev.load_text_tokens(tokenizer, calib_text)
    evl = pydoc[1] if eval_text is None else ev.load_text_tokens(tokenizer, eval_text)
    source = f"calib={calib_text or 'pydoc[:60%]'} eval={eval_text or 'pydoc[60%:]'}"
    return Corpus(np.asarray(calib, np.int32), np.asarray(evl, np.int32), source)


def check_token_ids(tokens, vocab_size: int | None, source: str) -> None:
    """ValueError unless every id lies in ``[0, vocab_size)`` (a tokenizer that does not belong
    to the model gives ids past its embedding: an index error or garbage, never a result)."""
    tokens = np.asarray(tokens)
    if vocab_size is None or tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"{source}: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
            "(the tokenizer does not match the model)"
        )


def check_finite_scores(scores: dict[str, dict], source: str) -> dict[str, dict]:
    """ValueError naming the model and metric when a score is NaN or infinite (a result is
    never NaN: the CLI exits non-zero and prints no JSON)."""
    for name, row in scores.items():
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(
                    f"the {name} model's {k} on {source} is {v} (non-finite logits: corrupted "
                    "weights or config?); no result"
                )
    return scores


def calibration_ids(
    tokens: np.ndarray,
    n_tokens: int,
    seq_len: int,
    *,
    source: str = "calibration text",
    vocab_size: int | None = None,
) -> np.ndarray:
    """The first ``n_tokens`` calibration tokens as ``[n_tokens // seq_len, seq_len]``.

    Raises ValueError when the text (named ``source`` in the message) is too short, saying how
    many tokens it has, or (given ``vocab_size``) holds ids outside the vocabulary.
    """
    if seq_len < 2 or n_tokens < seq_len:
        raise ValueError(
            f"calibration needs n_tokens >= seq_len >= 2, got {n_tokens} tokens, seq_len {seq_len}"
        )
    n_seq = n_tokens // seq_len
    need = n_seq * seq_len
    if len(tokens) < need:
        raise ValueError(
            f"{source} is too short: it has {len(tokens)} tokens, {need} were asked for "
            f"({n_seq} sequences of {seq_len}); give a longer --calib-text or fewer --calib-tokens"
        )
    ids = np.asarray(tokens[:need], np.int32).reshape(n_seq, seq_len)
    check_token_ids(ids, vocab_size, source)
    return ids


def evaluate_models(
    models: dict[str, Params],
    ref: Params,
    cfg: ModelConfig,
    eval_tokens: np.ndarray,
    *,
    seq_len: int = 512,
    max_chunks: int | None = 40,
    batch_size: int = 2,
    mesh=None,
    progress: bool = True,
    source: str = "evaluation text",
    allow_long: bool = False,
) -> dict[str, dict]:
    """Perplexity, KL from ``ref`` and top-1 agreement of each model (and ppl of ``ref``).

    The chunks follow ``eval.make_chunks`` (GPTQ protocol); the batch of chunks is sharded over
    the mesh's devices. Returns ``{name: {"ppl", "kl", "top1", "tokens"}}`` with ``"float"`` for
    the reference. ``source`` names the text in errors; ``seq_len`` beyond the model's
    ``max_position_embeddings`` is a ValueError unless ``allow_long``; so are token ids outside
    the vocabulary and a non-finite score (``check_finite_scores``).
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    cfg.check_positions(seq_len, f"seq_len {seq_len}", allow_long=allow_long)
    if seq_len >= 2 and len(eval_tokens) < seq_len:
        raise ValueError(
            f"{source} is too short: it has {len(eval_tokens)} tokens, one chunk of seq_len "
            f"{seq_len} needs {seq_len}"
        )
    mesh = data_mesh() if mesh is None else mesh
    chunks = ev.make_chunks(eval_tokens, seq_len, max_chunks)
    check_token_ids(chunks, cfg.vocab_size, source)
    fwd = ev.jitted_forward()
    ref = replicate(ref, mesh)
    models = {k: replicate(v, mesh) for k, v in models.items()}
    ndev = mesh.devices.size
    sums = ev.score_chunks(
        chunks,
        {"float": None, **{k: functools.partial(fwd, v, cfg) for k, v in models.items()}},
        functools.partial(fwd, ref, cfg),
        batch_size=max(ndev, -(-batch_size // ndev) * ndev),
        place=lambda b: shard_batch(b, mesh),
        progress=progress,
    )
    names = list(sums)
    n_pred = len(chunks) * (seq_len - 1)
    out = {}
    for n in names:
        nll, kl, agree = sums[n] / n_pred
        ppl = math.exp(nll) if nll < 709.0 else math.inf  # (exp overflows past 709)
        ppl = math.nan if math.isnan(nll) else ppl
        out[n] = {"ppl": ppl, "kl": float(kl), "top1": float(agree), "tokens": n_pred}
    return check_finite_scores(out, source)
