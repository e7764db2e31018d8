"""KV-cache inference: prefill, one-token decode steps, greedy and sampled generation.

The cache holds, per layer, k (after k_norm and RoPE) and v as ``[B, S_max, n_kv, d]`` in the
compute dtype, with ``S_max`` a power of two (fewer recompilations). All sequences of a batch share
the write index (prompts are left-padded); a ``[B, S_max]`` validity mask hides padding and every
slot not yet written, and ``next_pos [B]`` gives each sequence's next RoPE position.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arhq_jax.models.config import ModelConfig, Params
from arhq_jax.models.transformer import embed, head, layer_forward, positions_from_mask


@struct.dataclass
class KVCache:
    """Per-layer ``k``/``v`` tuples of ``[B, S_max, n_kv, d]``; ``valid [B, S_max]`` bool;
    ``index`` int32 scalar (next slot to write); ``next_pos [B]`` int32 (next RoPE position)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def cache_length(n: int) -> int:
    """The smallest power of two ≥ ``n`` (at least 16)."""
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (rounded up to 2^k)."""
    s = cache_length(max_len)
    shape = (batch, s, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        valid=jnp.zeros((batch, s), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


def _extend(
    params: Params, cfg: ModelConfig, ids: jax.Array, cache: KVCache, mask: jax.Array | None
) -> tuple[jax.Array, KVCache]:
    """Run ``ids [B, T]`` (validity ``mask [B, T]``) at slots ``index…index+T-1``."""
    if mask is None:
        mask = jnp.ones(ids.shape, bool)
    mask = mask.astype(bool)
    positions = positions_from_mask(mask, cache.next_pos)
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (jnp.zeros((), jnp.int32), cache.index))
    h = embed(params, cfg, ids)
    ks, vs = [], []
    for i, layer in enumerate(params.layers):
        h, (k, v), _ = layer_forward(
            layer,
            cfg,
            h,
            positions,
            attn_mask=valid,
            kv_cache=(cache.k[i], cache.v[i]),
            cache_index=cache.index,
        )
        ks.append(k)
        vs.append(v)
    logits = head(params, cfg, h)
    new = KVCache(
        k=tuple(ks),
        v=tuple(vs),
        valid=valid,
        index=cache.index + ids.shape[1],
        next_pos=cache.next_pos + mask.sum(-1, dtype=jnp.int32),
    )
    return logits, new


_extend_jit = jax.jit(_extend, static_argnames=("cfg",))


def _check_room(cache: KVCache, n: int) -> None:
    used = int(cache.index)
    if used + n > cache.max_len:
        raise ValueError(
            f"KV cache overflow: {used} slots used + {n} new > capacity {cache.max_len}"
        )


def prefill(
    params: Params,
    cfg: ModelConfig,
    ids: jax.Array,
    cache: KVCache,
    attn_mask: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run a (left-padded) prompt chunk ``ids [B, T]`` into the cache (jit-compiled).

    ``attn_mask [B, T]`` marks valid tokens. Returns logits ``[B, T, V]`` f32 and the new cache.
    Can be called repeatedly to prefill in chunks.
    """
    ids = jnp.asarray(ids, jnp.int32)
    _check_room(cache, ids.shape[1])
    mask = None if attn_mask is None else jnp.asarray(attn_mask).astype(bool)
    return _extend_jit(params, cfg, ids, cache, mask)


def decode_step(
    params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """One token per sequence, ``tokens [B]`` → logits ``[B, V]`` f32 and the new cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    _check_room(cache, 1)
    logits, cache = _extend_jit(params, cfg, tokens[:, None], cache, None)
    return logits[:, 0], cache


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Top-k then top-p (nucleus) filtering of ``logits [..., V]`` f32: dropped entries → -inf.

    As transformers' warpers: top-k keeps every logit ≥ the k-th largest; top-p keeps the
    smallest set of largest tokens whose probability mass reaches ``top_p`` (at least one).
    """
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        srt = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        p = jax.nn.softmax(srt, axis=-1)
        mass_before = jnp.cumsum(p, axis=-1) - p
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        thr = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        logits = jnp.where(logits < thr, neg, logits)
    return logits


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Next tokens ``[B]`` int32 from ``logits [B, V]``: argmax when ``temperature == 0``, else a
    draw from softmax(filter(logits / temperature))."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "cache_len", "temperature", "top_k", "top_p"),
)
def _generate(
    params, cfg, ids, mask, key, eos, pad, *, max_new_tokens, cache_len, temperature, top_k, top_p
):
    b = ids.shape[0]
    pick = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos[None, :], axis=-1)

    cache = init_cache(cfg, b, cache_len)
    logits, cache = _extend(params, cfg, ids, cache, mask)
    tok = pick(logits[:, -1], jax.random.fold_in(key, 0))
    done = is_eos(tok)
    out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        step, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, done, cache, out = state
        logits, cache = _extend(params, cfg, tok[:, None], cache, None)
        nxt = pick(logits[:, 0], jax.random.fold_in(key, step))
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.zeros((), jnp.int32), step))
        return step + 1, nxt, done | is_eos(nxt), cache, out

    state = (jnp.ones((), jnp.int32), tok, done, cache, out)
    n, _, _, _, out = jax.lax.while_loop(cond, body, state)
    return out, n


def generate(
    params: Params,
    cfg: ModelConfig,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | tuple[int, ...] | list[int] | None = None,
    pad_token_id: int | None = None,
    attn_mask=None,
    allow_long: bool = False,
) -> np.ndarray:
    """Autoregressive generation with a KV cache (prefill + a jit-compiled decode loop).

    Args:
      prompt_ids: ``[T]`` or ``[B, T]`` int (left-padded, with ``attn_mask [B, T]``, for ragged
        batches).
      temperature: 0 → greedy argmax; > 0 → sampling after top-k (0 = off) and top-p (1 = off)
        filtering, reproducible for a given ``seed``.
      eos_token_id: a sequence stops after emitting it (None: never); finished sequences are
        filled with ``pad_token_id`` (default: the first eos id), and generation ends when all are
        finished, as in transformers.
      allow_long: let prompt + new tokens exceed ``cfg.max_position_embeddings`` (otherwise a
        ValueError, see ``ModelConfig.check_positions``).

    Returns:
      ``np.ndarray`` int32: the prompt followed by the new tokens, ``[B, T + n]`` (``[T + n]`` for
      a 1-D prompt), ``n ≤ max_new_tokens``.
    """
    ids = np.asarray(prompt_ids)
    squeeze = ids.ndim == 1
    ids = np.atleast_2d(ids).astype(np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [T] or [B, T] with T > 0, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(
            f"prompt ids must lie in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}]"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    # Written so that NaN fails every test.
    if not (0.0 <= temperature < math.inf and 0.0 < top_p <= 1.0 and top_k >= 0):
        raise ValueError(
            f"need finite temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0; got {temperature}, {top_p}, "
            f"{top_k}"
        )
    cfg.check_positions(
        ids.shape[1] + int(max_new_tokens),
        f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens})",
        allow_long=allow_long,
    )
    mask = None
    if attn_mask is not None:
        mask = np.atleast_2d(np.asarray(attn_mask)).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attn_mask shape {mask.shape} != prompt shape {ids.shape}")
    if eos_token_id is None:
        eos = np.full((1,), -1, np.int32)  # matches no token
    else:
        eos = np.atleast_1d(np.asarray(eos_token_id, np.int32))
    pad = int(eos[0]) if pad_token_id is None and eos_token_id is not None else (pad_token_id or 0)
    out, n = _generate(
        params,
        cfg,
        jnp.asarray(ids),
        None if mask is None else jnp.asarray(mask),
        jax.random.key(seed),
        jnp.asarray(eos),
        jnp.asarray(pad, jnp.int32),
        max_new_tokens=int(max_new_tokens),
        cache_len=cache_length(ids.shape[1] + max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    res = np.concatenate([ids, np.asarray(out)[:, : int(n)]], axis=1)
    return res[0] if squeeze else res
