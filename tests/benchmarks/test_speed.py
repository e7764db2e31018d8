"""Speed properties that are not timings: what compiles, and how often."""

from __future__ import annotations

import pytest
from _tiny import CFG

from arhq_jax.evaluation.pipeline import evaluate_models
from arhq_jax.models import transformer
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model


def test_evaluation_compiles_once_per_model_structure(model):
    """Two methods whose quantized trees have the same structure and shapes (ARHQ and SVDQuant at
    one rank) share one compiled forward with each other; a second evaluation compiles nothing."""
    params, ids = model
    kw = dict(rank=4, w_fmt="nvfp4-paper", act_fmt="nvfp4-paper")
    q = {
        m: quantize_model(params, CFG, ids, QuantConfig(method=m, **kw), progress=False).params
        for m in ("arhq", "svdquant")
    }
    cache = transformer.forward_jit
    if not hasattr(cache, "_cache_size"):
        pytest.skip("this jax does not expose the jit cache size")
    tokens = ids.reshape(-1)
    before = cache._cache_size()
    evaluate_models(q, params, CFG, tokens, seq_len=32, max_chunks=2, progress=False)
    first = cache._cache_size() - before
    assert first <= 2  # at most the float model and the (shared) quantized structure
    evaluate_models(q, params, CFG, tokens, seq_len=32, max_chunks=2, progress=False)
    assert cache._cache_size() - before == first
