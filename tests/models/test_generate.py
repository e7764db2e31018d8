"""KV-cache decoding and generation against the full forward and transformers' ``generate``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import hf_model, jax_model, one_thread
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from arhq_jax.models.generate import (
    cache_length,
    decode_step,
    filter_logits,
    generate,
    init_cache,
    prefill,
    sample_logits,
)
from arhq_jax.models.transformer import forward

T = 80
LENGTHS = (
    80,
    53,
)  # the same left-padded batch as tests/models/test_models.py (shared compilations)
PROMPT_LENGTHS = (12, 7)
NEW = 16


def _padded(lengths, t, seed):
    ids = np.random.default_rng(seed).integers(0, 256, (len(lengths), t))
    mask = np.arange(t)[None, :] >= (t - np.asarray(lengths))[:, None]
    return np.where(mask, ids, 0), mask


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_prefill_and_decode_equal_full_forward(name):
    cfg, params = jax_model(name)
    ids, mask = _padded(LENGTHS, T, seed=1)
    full = np.asarray(forward(params, cfg, ids, attn_mask=mask))
    cache = init_cache(cfg, 2, T)
    assert cache.max_len == 128 and cache.k[0].shape == (2, 128, cfg.num_kv_heads, cfg.head_dim)
    got = []
    # Two prefill chunks (the first ends inside the padding of sequence 1), then one token at a
    # time.
    for a, b in ((0, 32), (32, 64)):
        logits, cache = prefill(params, cfg, ids[:, a:b], cache, attn_mask=mask[:, a:b])
        got.append(np.asarray(logits))
    for j in range(64, T):
        logits, cache = decode_step(params, cfg, ids[:, j], cache)
        got.append(np.asarray(logits)[:, None])
    got = np.concatenate(got, axis=1)
    assert int(cache.index) == T and list(np.asarray(cache.next_pos)) == list(LENGTHS)
    np.testing.assert_allclose(got[mask], full[mask], rtol=0, atol=2e-5)


def test_cache_capacity():
    cfg, params = jax_model("llama3")
    assert [cache_length(n) for n in (1, 16, 17, 80, 128, 129)] == [16, 16, 32, 128, 128, 256]
    cache = init_cache(cfg, 2, 16)
    with pytest.raises(ValueError, match="overflow"):
        prefill(params, cfg, np.zeros((2, 17), np.int32), cache)
    with pytest.raises(ValueError, match="overflow"):
        decode_step(params, cfg, np.zeros(2, np.int32), cache.replace(index=jnp.int32(16)))


def _hf_generate(model, ids, mask, new, eos):
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with one_thread():
        out = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask).long(), generation_config=gc
        )
    return out.numpy()


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_greedy_equals_transformers(name):
    cfg, params = jax_model(name)
    model = hf_model(name)
    ids, mask = _padded(PROMPT_LENGTHS, PROMPT_LENGTHS[0], seed=2)
    t0 = ids.shape[1]
    # The config's eos (Llama: 2, which sequence 0 emits first; Qwen3: none), then a token that
    # sequence 0 emits mid-way. Finished sequences are padded with 0 and generation ends when all
    # are finished, as in transformers.
    ours = generate(
        params, cfg, ids, NEW, attn_mask=mask, eos_token_id=cfg.eos_token_id, pad_token_id=0
    )
    np.testing.assert_array_equal(ours, _hf_generate(model, ids, mask, NEW, cfg.eos_token_id))
    assert ours.shape == (2, t0 + NEW)
    eos = int(ours[1, t0 + 4])
    ours_eos = generate(params, cfg, ids, NEW, attn_mask=mask, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(ours_eos, _hf_generate(model, ids, mask, NEW, eos))
    assert eos in ours_eos[1, t0 : t0 + 5]
    if name == "llama3":
        # The padded sequence alone, unpadded, gives the same tokens.
        n = PROMPT_LENGTHS[1]
        single = generate(params, cfg, ids[1, -n:], NEW, eos_token_id=cfg.eos_token_id)
        np.testing.assert_array_equal(single[n:], ours[1, t0 : t0 + len(single) - n])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    cfg, params = jax_model("llama3")
    ids, mask = _padded(PROMPT_LENGTHS, PROMPT_LENGTHS[0], seed=2)
    greedy = generate(params, cfg, ids, NEW, attn_mask=mask)
    top1 = generate(params, cfg, ids, NEW, attn_mask=mask, temperature=0.7, top_k=1, seed=5)
    np.testing.assert_array_equal(top1, greedy)
    kw = {"attn_mask": mask, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = generate(params, cfg, ids, NEW, seed=1, **kw)
    b = generate(params, cfg, ids, NEW, seed=1, **kw)
    c = generate(params, cfg, ids, NEW, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    np.testing.assert_array_equal(a[:, : ids.shape[1]], ids)


def _hf_filter(logits, temperature, top_k, top_p):
    x = torch.as_tensor(logits)
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.numpy()


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.6, 0, 0.8), (1.3, 5, 0.7)])
def test_sampling_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(7).normal(0, 2, (64, 10)).astype(np.float32)
    ref = _hf_filter(logits, temperature, top_k, top_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits) / temperature, top_k=top_k, top_p=top_p))
    # Same support, same kept values.
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
    # Empirical frequencies of 20000 draws (first 4 rows) against the filtered softmax.
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(
        jax.vmap(
            lambda k: sample_logits(
                jnp.asarray(logits[:4]), k, temperature=temperature, top_k=top_k, top_p=top_p
            )
        )
    )
    toks = np.asarray(draw(keys))  # [n, 4]
    p = np.exp(ref[:4] - ref[:4].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for r in range(4):
        freq = np.bincount(toks[:, r], minlength=10) / n
        assert np.all(freq[p[r] == 0] == 0)
        np.testing.assert_allclose(freq, p[r], atol=0.015)


def test_generate_rejects_bad_input():
    cfg, params = jax_model("llama3")
    with pytest.raises(ValueError, match="prompt ids"):
        generate(params, cfg, np.array([[1, 300]]), 2)
    with pytest.raises(ValueError, match="attn_mask"):
        generate(params, cfg, np.array([[1, 2]]), 2, attn_mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match="top_p"):
        generate(params, cfg, np.array([[1, 2]]), 2, temperature=1.0, top_p=0.0)
