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


def test_torch_quantize_is_optimal_under_each_linears_own_g():
    """Sharing G within an input group changes nothing: every linear's split reaches the ARHQ
    optimum Σ_{i>r} σ_i(W G½)² of the G of its own input, accumulated here by a plain hook per
    linear in f64 (q/k/v and gate/up read one tensor, o and down their own)."""
    import tiny_models

    model = tiny_models.hf_model("llama3")
    ids = np.random.default_rng(2).integers(0, 256, (4, 32))
    out, timings = torch_reference.quantize(model, ids, rank=4, batch_size=2)
    assert set(timings) == {"calibration_s", "decomposition_s"}
    linears = {
        n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert set(out) == set(linears) and len(out) == 14
    grams = {n: np.zeros((m.in_features,) * 2) for n, m in linears.items()}

    def hook(name):
        def fn(_mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            e = (x - torch_reference.fake_quant(x)).double().numpy()
            grams[name] += e.T @ e

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for start in range(0, len(ids), 2):
            model.model(input_ids=torch.from_numpy(ids[start : start + 2]))
    for h in handles:
        h.remove()
    for name, lin in linears.items():
        g = grams[name] / ids.size
        lam, u = np.linalg.eigh(g)
        g_half = (u * np.sqrt(np.maximum(lam, 1e-6))) @ u.T
        w = lin.weight.detach().double().numpy()
        sig = np.linalg.svd(w @ g_half, compute_uv=False)
        b, a, _ = (t.double().numpy() for t in out[name])
        got = np.linalg.norm((w - b @ a.T) @ g_half) ** 2
        best = np.sum(sig[4:] ** 2)
        assert best <= got <= best * (1 + 1e-3) + 1e-6 * sig[0] ** 2, name
