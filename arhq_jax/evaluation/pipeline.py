"""The end-to-end job behind the CLI and the demo: tokens → calibrate/quantize → evaluate.

Thin glue over the functional core: token bookkeeping (disjoint calibration and evaluation
parts), one evaluation pass that scores several models against the same float reference (the
float logits of a chunk are computed once), and the result rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import numpy as np

import arhq_jax.evaluation.metrics as ev
import arhq_jax.evaluation.ref_cache as ref_cache
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
    ref_identity: dict | None = None,
    cache_root=None,
    warn=None,
    info: dict | None = None,
) -> dict[str, dict]:
    """Perplexity, KL from ``ref`` and top-1 agreement of each model (and ppl of ``ref``).

    The chunks follow ``eval.make_chunks`` (GPTQ protocol); the batch of chunks is sharded over
    the mesh's devices. Returns ``{name: {"ppl", "kl", "top1", "tokens"}}`` with ``"float"`` for
    the reference. ``source`` names the text in errors; ``seq_len`` beyond the model's
    ``max_position_embeddings`` is a ValueError unless ``allow_long``; so are token ids outside
    the vocabulary and a non-finite score (``check_finite_scores``).

    Given ``ref_identity`` (the float model's identity: its fingerprint and dtypes) and
    ``cache_root`` (``ref_cache.cache_dir()``), the float reference is cached there
    (``evaluation.ref_cache``): a hit gives the same numbers without running ``ref``, a
    corrupted entry is reported through ``warn`` and recomputed. ``info`` (a dict, if given)
    receives ``"reference"``: ``"cache"`` or ``"computed"``.
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
    ndev = mesh.devices.size
    bs = max(ndev, -(-batch_size // ndev) * ndev)
    n_pred = len(chunks) * (seq_len - 1)
    cache = entry = None
    shape = (len(chunks), seq_len, cfg.vocab_size)
    if ref_identity is not None and cache_root is not None:
        key = ref_cache.reference_key(ref_identity, chunks, bs, ndev)
        cache = ref_cache.RefCache(cache_root, key, warn)
        entry = cache.load(shape)
    if info is not None:
        info["reference"] = "computed"
    if entry is not None and (not models or entry.logits is not None):
        if info is not None:
            info["reference"] = "cache"
        if not models:
            return _scores({"float": entry.sums}, n_pred, source)
    models = {k: replicate(v, mesh) for k, v in models.items()}
    place = functools.partial(shard_batch, mesh=mesh)
    record = cache is not None and entry is None
    keep = record and 4 * int(np.prod(shape)) <= ref_cache.max_bytes()
    if entry is not None and entry.logits is not None:
        ref_fn = _cached_reference(entry.logits, bs, place)
    else:
        ref_fn = functools.partial(fwd, replicate(ref, mesh), cfg)
    with cache.logits_writer(shape) if keep else contextlib.nullcontext() as put:
        if put is not None:
            ref_fn = _recording(ref_fn, put, bs)
        sums = ev.score_chunks(
            chunks,
            {"float": None, **{k: functools.partial(fwd, v, cfg) for k, v in models.items()}},
            ref_fn,
            batch_size=bs,
            place=place,
            progress=progress,
        )
        out = _scores(sums, n_pred, source)  # (no entry is written for a non-finite score)
    if record:
        cache.save(sums["float"], n_pred, logits=keep)
    return out


def _cached_reference(logits: np.ndarray, batch_size: int, place):
    """A reference ``logits_fn`` replaying cached logits ``[n, L, V]`` batch by batch, in the
    order ``score_chunks`` asks for them (the last batch padded with its last row, as the ids
    are)."""
    calls = [0]

    def fn(ids):
        start = calls[0] * batch_size
        calls[0] += 1
        rows = np.asarray(logits[start : start + batch_size])
        if len(rows) < batch_size:
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])
        if rows.shape[:2] != tuple(ids.shape):
            raise ValueError(f"cached reference has rows {rows.shape[:2]} for ids {ids.shape}")
        return place(rows)

    return fn


def _recording(fn, put, batch_size: int):
    """``fn`` that also hands each batch's logits (f32, on the host) to ``put(start, rows)``,
    batch by batch in ``score_chunks``' order."""
    calls = [0]

    def rec(ids):
        x = fn(ids)
        put(calls[0] * batch_size, np.asarray(jax.device_get(x), np.float32))
        calls[0] += 1
        return x

    return rec


def _scores(sums: dict, n_pred: int, source: str) -> dict[str, dict]:
    names = list(sums)
    out = {}
    for n in names:
        nll, kl, agree = sums[n] / n_pred
        ppl = math.exp(nll) if nll < 709.0 else math.inf  # (exp overflows past 709)
        ppl = math.nan if math.isnan(nll) else ppl
        out[n] = {"ppl": ppl, "kl": float(kl), "top1": float(agree), "tokens": n_pred}
    return check_finite_scores(out, source)
