"""The tiny random model of the benchmarks' ``--tiny`` mode (a smoke run on any CPU, no download).

``tests/benchmarks/test_smoke.py`` runs every benchmark script with ``--tiny`` in a subprocess, so
that a script broken by a refactor or an installed package fails the suite. The model is a
2-layer Llama with 64 hidden features and a 128-token vocabulary (random weights, no tokenizer);
its "corpus" is random token ids.

Scripts import it as ``benchmarks.bench_tiny`` with the repository root first on ``sys.path``
(``benchmarks/`` itself never is: its module names must not shadow installed packages).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from arhq_jax.evaluation.pipeline import Corpus
from arhq_jax.models.config import ModelConfig
from arhq_jax.models.params import random_params
from converters import save_hf_dir
from converters.registry import LoadedModel

CFG = ModelConfig(
    family="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
SEQ_LEN = 32  # calibration / evaluation sequence length of the tiny runs
CALIB_TOKENS = 256


def tiny_model(seed: int = 0) -> LoadedModel:
    """The tiny random Llama as ``converters.load_model`` returns a model (no tokenizer)."""
    params = random_params(CFG, jax.random.key(seed), std=0.08)
    return LoadedModel(CFG, params, None, "tiny")


def tiny_corpus(n_tokens: int = 4096, seed: int = 0) -> Corpus:
    """Random token ids: a calibration and an evaluation part of ``n_tokens`` each (int32)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=2 * n_tokens, dtype=np.int32)
    return Corpus(ids[:n_tokens], ids[n_tokens:], "random ids (tiny)")


def tiny_hf_dir(path: str | Path, seed: int = 0) -> Path:
    """The tiny model written as a HF directory at ``path`` (a source for ``open_source``)."""
    m = tiny_model(seed)
    return save_hf_dir(m.cfg, m.params, path)


def byte_tokenizer(text: str) -> dict:
    """The tiny model's stand-in for a tokenizer: a text's UTF-8 bytes modulo the vocabulary
    (what ``metrics.load_text_tokens`` calls), so a ``--tiny`` run can read a real text file."""
    return {"input_ids": [b % CFG.vocab_size for b in text.encode("utf-8")]}
