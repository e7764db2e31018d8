"""Llama/Qwen3 ports against transformers (eager, f32) on tiny random models."""

from __future__ import annotations

import copy
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import struct
from tiny_models import LLAMA3_SCALING, NAMES, hf_logits, hf_model, jax_model, state_dict_numpy
from transformers import AutoConfig

from arhq_jax.models import PROJECTIONS, config_from_hf, config_to_hf
from arhq_jax.models.config import INPUT_GROUPS
from arhq_jax.models.params import (
    expected_tensors,
    params_from_tensors,
    params_to_tensors,
    random_params,
)
from arhq_jax.models.transformer import (
    embed,
    forward,
    head,
    layer_forward_jit,
    rope_inv_freq,
    rope_tables,
)

T = 80  # > original_max_position_embeddings = 64 of the llama3 model
LENGTHS = (80, 53)  # the left-padded batch shared with test_generate (same compiled shapes)


def _ids(b=2, t=T, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t))


def _padded_batch():
    ids = _ids(len(LENGTHS), T, seed=1)
    mask = np.arange(T)[None, :] >= (T - np.asarray(LENGTHS))[:, None]
    return np.where(mask, ids, 0), mask


# --- RoPE --------------------------------------------------------------------------------------


def _llama3_inv_freq_f64(theta, d, s):
    # Independent float64 transcription of docs/spec/models.md §2 (llama3 scaling).
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    f, lf, hf, l0 = (
        s[k]
        for k in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
    )
    wl = 2 * np.pi / inv
    sigma = (l0 / wl - lf) / (hf - lf)
    return np.where(
        wl > l0 / lf, inv / f, np.where(wl < l0 / hf, inv, inv * ((1 - sigma) / f + sigma))
    )


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_rope_tables_match_transformers(name):
    model = hf_model(name)
    cfg, _ = jax_model(name)
    inv = rope_inv_freq(cfg)
    # The f32 recipe is reproduced bit for bit.
    np.testing.assert_array_equal(inv, model.model.rotary_emb.inv_freq.numpy())
    pos = np.stack([np.arange(4096), np.arange(4096)[::-1] * 3])
    cos, sin = rope_tables(cfg, jnp.asarray(pos, jnp.int32))
    hc, hs = model.model.rotary_emb(torch.zeros(1), torch.as_tensor(pos))
    np.testing.assert_allclose(np.asarray(cos), hc.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), hs.numpy(), rtol=0, atol=2e-6)
    if name == "llama3":
        ref = _llama3_inv_freq_f64(cfg.rope_theta, cfg.head_dim, LLAMA3_SCALING)
        np.testing.assert_allclose(inv, ref, rtol=2e-6)
        plain = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        ratio = ref / plain
        # The tiny config exercises all three regimes: kept, smoothed, divided by the factor.
        assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, 1 / 8))
        assert np.any((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3))


# --- logits parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_f32(name):
    ids = _ids()
    ref = hf_logits(hf_model(name), ids)
    cfg, params = jax_model(name)
    out = forward(params, cfg, ids)
    assert out.dtype == jnp.float32 and out.shape == (2, T, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_bf16_path_is_close(name):
    ids = _ids()
    model = hf_model(name)
    ref = hf_logits(model, ids)
    hf_bf16 = hf_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
    cfg, params = jax_model(name, "bfloat16", "bfloat16")
    assert params.embed.dtype == jnp.bfloat16 and params.layers[0].q_proj.w.dtype == jnp.bfloat16
    # The bf16 cast of the parameters is the one torch makes, bit for bit.
    w_torch = model.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(params.layers[0].q_proj.w).view(np.uint16),
        w_torch.view(torch.int16).numpy().view(np.uint16),
    )
    out = np.asarray(forward(params, cfg, ids))
    err, hf_err = np.abs(out - ref).max(), np.abs(hf_bf16 - ref).max()
    assert 1e-3 < err <= 2 * hf_err, (err, hf_err)  # really bf16, and as close as transformers'
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) > 0.9


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_left_padding_equals_unpadded(name):
    ids, mask = _padded_batch()
    cfg, params = jax_model(name)
    out = np.asarray(forward(params, cfg, ids, attn_mask=mask))
    model = hf_model(name)
    for b, n in enumerate(LENGTHS):
        ref = hf_logits(model, ids[b : b + 1, T - n :])[0]
        np.testing.assert_allclose(out[b, T - n :], ref, rtol=0, atol=1e-4)


# --- layer by layer: captured group inputs and the pluggable linear ---------------------------


@pytest.mark.parametrize("name", ["qwen3", "llama_bias"])
def test_captured_inputs_equal_projection_inputs(name):
    model = hf_model(name)
    cfg, params = jax_model(name)
    ids = _ids()
    seen: dict[tuple[int, str], np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for p in PROJECTIONS:
            mod = getattr(
                layer.self_attn if p in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, p
            )
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, args, key=(i, p): seen.__setitem__(key, args[0].detach().numpy())
                )
            )
    try:
        ref = hf_logits(model, ids)
    finally:
        for hk in hooks:
            hk.remove()

    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    h = embed(params, cfg, jnp.asarray(ids))
    for i, layer in enumerate(params.layers):
        h, cache, cap = layer_forward_jit(layer, cfg, h, pos, capture=True)
        assert cache is None and set(cap) == set(INPUT_GROUPS)
        for group, projs in INPUT_GROUPS.items():
            for p in projs:
                x = seen[(i, p)]
                assert cap[group].shape == x.shape
                np.testing.assert_allclose(np.asarray(cap[group]), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(head(params, cfg, h)), ref, rtol=0, atol=1e-4)


@struct.dataclass
class _TransposedLinear:
    """A non-Dense linear (weights stored [in, out]): the model must only call it."""

    wt: jax.Array
    b: jax.Array | None

    in_features = property(lambda self: self.wt.shape[0])
    out_features = property(lambda self: self.wt.shape[1])

    def __call__(self, x):
        y = jnp.einsum("...k,kn->...n", x, self.wt, precision=jax.lax.Precision.HIGHEST)
        return (y if self.b is None else y + self.b).astype(x.dtype)


def test_projections_are_pluggable():
    cfg, params = jax_model("llama_bias")
    layers = tuple(
        layer.replace(
            **{
                p: _TransposedLinear(getattr(layer, p).w.T, getattr(layer, p).b)
                for p in PROJECTIONS
            }
        )
        for layer in params.layers
    )
    ids = _ids()
    out = forward(params.replace(layers=layers), cfg, ids)
    ref = hf_logits(hf_model("llama_bias"), ids)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4)


# --- params <-> tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_params_to_tensors_inverts_params_from_tensors(name):
    model = hf_model(name)
    cfg, params = jax_model(name)
    sd = state_dict_numpy(model)
    out = list(params_to_tensors(cfg, params))
    assert [k for k, _ in out] == list(expected_tensors(cfg))
    expected_keys = set(sd) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert {k for k, _ in out} == expected_keys
    for k, v in out:
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    # transformers 5.x omits lm_head.weight from tied checkpoints: absent -> tied.
    no_head = params_from_tensors(cfg, {k: v for k, v in out}.get)
    assert no_head.lm_head is None if cfg.tie_word_embeddings else no_head.lm_head is not None
    np.testing.assert_array_equal(np.asarray(no_head.embed), sd["model.embed_tokens.weight"])


def test_random_params_load_into_transformers():
    cfg, _ = jax_model("llama3")
    params = random_params(cfg, jax.random.key(3))
    model = copy.deepcopy(hf_model("llama3"))
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in params_to_tensors(cfg, params)}
    )
    ids = _ids()
    np.testing.assert_allclose(
        np.asarray(forward(params, cfg, ids)), hf_logits(model, ids), rtol=0, atol=1e-4
    )
    norm = np.asarray(params.layers[1].post_norm)
    assert np.std(norm) > 0.01 and abs(np.mean(norm) - 1) < 0.1


# --- config.json -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_through_transformers(name, tmp_path):
    cfg, _ = jax_model(name)
    d = config_to_hf(cfg)
    (tmp_path / "config.json").write_text(json.dumps(d))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(hf_model(name).config)
    assert config_from_hf(loaded.to_dict()) == cfg
    assert config_from_hf(d) == cfg
    assert loaded.rope_parameters == hf_model(name).config.rope_parameters


def test_config_4x_form_equals_5x_form():
    d5 = hf_model("llama3").config.to_dict()
    d4 = {k: v for k, v in d5.items() if k != "rope_parameters"}
    scaling = {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}
    d4.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    cfg = config_from_hf(d5)
    assert config_from_hf(d4) == cfg
    assert cfg.rope_type == "llama3" and cfg.rope_scaling_dict() == scaling
    # rope_parameters wins over a stale top-level rope_theta.
    assert config_from_hf({**d5, "rope_theta": 1.0}) == cfg
    # A missing θ means 10000.
    d_plain = {k: v for k, v in d4.items() if k not in ("rope_theta", "rope_scaling")}
    assert config_from_hf(d_plain).rope_theta == 10000.0
    assert config_from_hf(d_plain).rope_type == "default"
    # Architectures alone dispatch too; eos lists stay hashable; dtypes are normalised.
    d_arch = {k: v for k, v in d5.items() if k != "model_type"}
    d_arch.update(architectures=["LlamaForCausalLM"], eos_token_id=[7, 9])
    c = config_from_hf(d_arch, param_dtype=jnp.bfloat16, dtype="float32")
    assert c.eos_token_id == (7, 9) and c.param_dtype == "bfloat16" and hash(c)


# --- errors ------------------------------------------------------------------------------------


def _qwen_dict(**kw):
    return {**hf_model("qwen3").config.to_dict(), **kw}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "llama3"),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "llama3"),
        ({"use_sliding_window": True, "sliding_window": 64}, "sliding"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"rms_norm_eps": None}, "rms_norm_eps"),
        (
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            },
            "partial",
        ),
        ({"model_type": "mistral"}, "llama, qwen3"),
        ({"model_type": None, "architectures": ["GPT2LMHeadModel"]}, "Qwen3ForCausalLM"),
    ],
)
def test_unsupported_configs_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(_qwen_dict(**change))


def test_unsupported_dtype_is_rejected():
    with pytest.raises(ValueError, match="bfloat16"):
        config_from_hf(_qwen_dict(), param_dtype="float16")


def _tensors(name):
    cfg, params = jax_model(name)
    return cfg, {k: np.array(v) for k, v in params_to_tensors(cfg, params)}


def test_bad_tensors_are_rejected():
    cfg, t = _tensors("llama3")
    key = "model.layers.1.self_attn.k_proj.weight"
    bad = {**t, key: t[key][:-1]}
    with pytest.raises(ValueError, match=r"k_proj.*expected shape \(32, 64\), got \(31, 64\)"):
        params_from_tensors(cfg, bad.get)
    with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
        params_from_tensors(cfg, {k: v for k, v in t.items() if k != "model.norm.weight"}.get)
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings is false"):
        params_from_tensors(cfg, {k: v for k, v in t.items() if k != "lm_head.weight"}.get)
    nan = t["model.layers.0.mlp.up_proj.weight"].copy()
    nan[3, 5] = np.nan
    with pytest.raises(ValueError, match="up_proj.weight.*non-finite"):
        params_from_tensors(cfg, {**t, "model.layers.0.mlp.up_proj.weight": nan}.get)
    with pytest.raises(ValueError, match="float"):
        params_from_tensors(cfg, {**t, "model.norm.weight": np.ones(64, np.int32)}.get)

    cfg_b, tb = _tensors("llama_bias")
    with pytest.raises(ValueError, match="o_proj.bias"):
        params_from_tensors(
            cfg_b, {k: v for k, v in tb.items() if k != "model.layers.0.self_attn.o_proj.bias"}.get
        )
    with pytest.raises(ValueError, match="differs"):
        other = tb["model.embed_tokens.weight"] + 1.0
        params_from_tensors(cfg_b, {**tb, "lm_head.weight": other}.get)
    q = params_from_tensors(cfg_b, {**tb, "lm_head.weight": tb["model.embed_tokens.weight"]}.get)
    assert q.lm_head is None


def test_quantized_linear_cannot_be_exported():
    cfg, params = jax_model("llama3")
    lin = params.layers[0].down_proj
    layers = (
        params.layers[0].replace(down_proj=_TransposedLinear(lin.w.T, None)),
    ) + params.layers[1:]
    with pytest.raises(ValueError, match="down_proj.*Dense"):
        list(params_to_tensors(cfg, params.replace(layers=layers)))


def test_forward_rejects_bad_shapes():
    cfg, params = jax_model("llama3")
    with pytest.raises(ValueError, match="attn_mask"):
        forward(params, cfg, _ids(), attn_mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        forward(params, cfg, _ids()[0])
    assert math.isfinite(float(jnp.abs(forward(params, cfg, _ids())).max()))


@pytest.mark.parametrize("block", [8, 16, 64])
def test_causal_block_attention_equals_the_full_square(block):
    """Query blocks that skip the keys past their end give the full masked square's output
    (40 tokens: uneven last blocks; left padding masks keys too; GQA 6/2 heads)."""
    from arhq_jax.models.transformer import attention, attention_bias

    rng = np.random.default_rng(block)
    q, k, v = (rng.standard_normal((3, 40, n, 8)).astype(np.float32) * 2 for n in (6, 2, 2))
    valid = np.ones((3, 40), bool)
    valid[1, :5] = False  # left padding
    bias = attention_bias(jnp.asarray(valid), 40, 0, jnp.float32)
    full = np.asarray(attention(q, k, v, bias, 8**-0.5))
    got = np.asarray(attention(q, k, v, bias, 8**-0.5, causal_block=block))
    real = np.repeat(valid[:, :, None], 48, axis=2)  # padded queries' outputs are meaningless
    np.testing.assert_allclose(got[real], full[real], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="as many keys"):
        attention(q[:, :20], k, v, bias[:, :20], 1.0, causal_block=8)
