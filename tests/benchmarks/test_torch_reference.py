"""The torch yardstick of benchmarks/pipeline.py computes what arhq-jax computes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from _bench_loader import load_benchmark  # noqa: E402

torch_reference = load_benchmark("torch_reference")

from arhq_jax.decomposition import decompose  # noqa: E402
from arhq_jax.numerics.formats import fake_quant  # noqa: E402


def test_torch_fake_quant_is_nvfp4_paper_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 96)) * np.exp(rng.normal(0, 3, (64, 1)))).astype(np.float32)
    x[0, :16] = 0.0  # an all-zero block
    x[1, :16] = np.float32(1e-13)  # below the scale floor
    x[2, :4] = [0.25, -0.25, 0.75, -2.5]  # ties (scale 1 once the block max is 6)
    x[2, 4] = 6.0
    got = torch_reference.fake_quant(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, np.asarray(fake_quant(jnp.asarray(x), "nvfp4-paper")))


def test_torch_split_equals_arhq_jax():
    """Its eigh + SVD steps give arhq-jax's branch B Aᵀ for the same W and G."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 32)).astype(np.float32)
    e = (rng.standard_normal((300, 32)) * np.exp(rng.normal(0, 1, 32))).astype(np.float32)
    g = e.T @ e / 300
    lam, u = torch.linalg.eigh(torch.from_numpy(g))
    root = lam.clamp_min(1e-6).sqrt()
    um, s, vt = torch.linalg.svd(torch.from_numpy(w) @ ((u * root) @ u.T), full_matrices=False)
    branch = (um[:, :4] * s[:4]) @ ((u / root) @ u.T @ vt[:4].T).T
    split = decompose.arhq(w, g, 4)
    ref = np.asarray(split.b, np.float64) @ np.asarray(split.a, np.float64).T
    assert np.linalg.norm(branch.numpy() - ref) <= 1e-4 * np.linalg.norm(w)
