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


def test_streamed_layers_after_the_first_compile_nothing(tmp_path, monkeypatch):
    """``quantize_stream`` reads each layer from disk as new host arrays: every program (forward,
    statistics, decompositions, packing) compiles for layer 0 and is reused by the later layers
    of the same shapes (no recompilation per layer, also with the read-ahead and writer
    threads)."""
    import logging

    import jax

    from arhq_jax.models.params import random_params
    from arhq_jax.run import stream
    from converters import save_hf_dir
    from converters.lazy import open_source

    cfg = CFG.replace(num_layers=3)
    save_hf_dir(cfg, random_params(cfg, jax.random.key(0), std=0.08), tmp_path / "m")
    ids = jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size)
    compiled = []

    class Count(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                compiled.append(record.getMessage())

    per_layer = []
    real = stream.quantize_layer

    def counted(*args, **kw):
        n = len(compiled)
        out = real(*args, **kw)
        per_layer.append(len(compiled) - n)
        return out

    monkeypatch.setattr(stream, "quantize_layer", counted)
    jax.clear_caches()  # (another test of this module compiled the same shapes)
    handler, log = Count(), logging.getLogger("jax")
    log.addHandler(handler)
    try:
        with jax.log_compiles(True), open_source(tmp_path / "m") as src:
            qcfg = QuantConfig(method="arhq", rank=4, w_fmt="nvfp4-paper", act_fmt="nvfp4-paper")
            stream.quantize_stream(src, ids, qcfg, tmp_path / "out", progress=False)
    finally:
        log.removeHandler(handler)
    assert len(per_layer) == 3 and per_layer[0] > 0  # (the log works: layer 0 compiles)
    assert per_layer[1:] == [0, 0], compiled
