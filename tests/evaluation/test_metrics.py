"""arhq_jax.evaluation.metrics: corpus split, GPTQ-style perplexity, KL and top-1 against float64
references."""

from __future__ import annotations

import numpy as np
import pytest

from arhq_jax.evaluation import metrics as ev

V = 37


def _bigram(seed):
    # A bigram "model": logits[b, t] = table[ids[b, t]]; cheap and exactly computable in f64.
    table = np.random.default_rng(seed).normal(0, 2.0, (V, V)).astype(np.float32)
    return table, lambda ids: table[np.asarray(ids)]


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(ids, seq_len, table, ref_table=None, max_chunks=None):
    """Brute force in float64, position by position."""
    n = len(ids) // seq_len
    if max_chunks:
        n = min(n, max_chunks)
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for c in range(n):
        chunk = ids[c * seq_len : (c + 1) * seq_len]
        for t in range(seq_len - 1):
            lq = _log_softmax64(table[chunk[t]])
            nll -= lq[chunk[t + 1]]
            if ref_table is not None:
                lp = _log_softmax64(ref_table[chunk[t]])
                kl += float(np.sum(np.exp(lp) * (lp - lq)))
                agree += int(np.argmax(lp) == np.argmax(lq))
            count += 1
    return np.exp(nll / count), kl / count, agree / count, count


def test_pydoc_corpus_and_split():
    from pydoc_data.topics import topics

    text = ev.pydoc_corpus()
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(v) for v in topics.values()) + 2 * (len(keys) - 1)
    pos = 0  # values appear in sorted-key order, separated by exactly "\n\n"
    for k in keys:
        assert text[pos : pos + len(topics[k])] == topics[k]
        pos += len(topics[k]) + 2

    ids = np.arange(1001)
    calib, held = ev.split_tokens(ids)
    assert len(calib) == 600 and len(held) == 401
    assert np.array_equal(np.concatenate([calib, held]), ids)
    assert not set(calib.tolist()) & set(held.tolist())
    with pytest.raises(ValueError, match="calib_fraction"):
        ev.split_tokens(ids, 1.0)


def test_perplexity_kl_top1_match_float64_bruteforce():
    table, fn = _bigram(0)
    ref_table, ref_fn = _bigram(1)
    ids = np.random.default_rng(2).integers(0, V, 7 * 16 + 5)  # 7 chunks + a dropped tail
    ppl, kl, top1, count = _reference(ids, 16, table, ref_table)
    for bs in (1, 3):  # 3 does not divide 7: the padded last batch must not count
        r = ev.evaluate(fn, None, ids, seq_len=16, ref_logits_fn=ref_fn, batch_size=bs)
        assert r.n_chunks == 7 and r.n_predictions == count == 7 * 15
        np.testing.assert_allclose(r.ppl, ppl, rtol=1e-5)
        np.testing.assert_allclose(r.kl, kl, rtol=1e-4)
        assert r.top1 == top1
    # Without a reference: no KL/top-1; against itself: KL 0 and full agreement.
    r = ev.evaluate(fn, None, ids, seq_len=16, max_chunks=2, progress=False)
    assert r.kl is None and r.top1 is None and r.n_chunks == 2
    np.testing.assert_allclose(r.ppl, _reference(ids, 16, table, max_chunks=2)[0], rtol=1e-5)
    r = ev.evaluate(fn, None, ids, seq_len=16, ref_logits_fn=fn, progress=False)
    assert abs(r.kl) < 1e-6 and r.top1 == 1.0


def test_too_short_text_is_an_error():
    _, fn = _bigram(0)
    with pytest.raises(ValueError, match=r"30 tokens.*needs 64"):
        ev.evaluate(fn, None, np.zeros(30, np.int32), seq_len=64)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, V\)"):
        ev.evaluate(fn, None, np.full(99, -1, np.int32), seq_len=8)
    with pytest.raises(ValueError, match="cfg"):
        ev.evaluate(_ParamsLike(), None, np.zeros(99, np.int32), seq_len=8)


class _ParamsLike:
    layers = ()


def test_load_text_tokens_from_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    f = tmp_path / "t.txt"
    f.write_text("the cat sat\n\nthe dog")
    ids = ev.load_text_tokens(tok, f)
    assert ids.dtype == np.int32 and ids.tolist() == [1, 2, 3, 1, 0]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ev.load_text_tokens(tok, tmp_path / "nope.txt")
