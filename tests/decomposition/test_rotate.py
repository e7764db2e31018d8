"""Block-Hadamard rotations (arhq_jax.decomposition.rotate): orthogonal, exact against float64
numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard as scipy_hadamard

from arhq_jax.decomposition import rotate
from arhq_jax.linears.base import Dense
from arhq_jax.linears.quantized import QuantLinear


@pytest.mark.parametrize("b", [1, 2, 16, 64])
def test_hadamard_orthogonal_and_matches_scipy(b):
    h = np.asarray(rotate.hadamard(b, jnp.float32), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(b), atol=1e-6)
    np.testing.assert_allclose(h * np.sqrt(b), scipy_hadamard(b), atol=1e-6)


@pytest.mark.parametrize("n,b", [(48, 16), (64, 64), (24, 8)])
def test_rotate_matches_dense_float64(n, b):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, n)) * np.exp(rng.standard_normal(n))  # outlier channels
    r = np.kron(np.eye(n // b), scipy_hadamard(b) / np.sqrt(b))
    ref = x @ r
    got = np.asarray(rotate.rotate(jnp.asarray(x, jnp.float32), b), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(rotate.rotation_matrix(n, b, jnp.float64)), r)
    with jax.enable_x64(True):
        got64 = np.asarray(rotate.rotate(jnp.asarray(x), b))
    np.testing.assert_allclose(got64, ref, rtol=1e-12, atol=1e-12)


def test_rotation_preserves_output_and_gram():
    rng = np.random.default_rng(1)
    n, b = 32, 16
    x = rng.standard_normal((40, n))
    w = rng.standard_normal((7, n))
    with jax.enable_x64(True):
        xr = np.asarray(rotate.rotate(jnp.asarray(x), b))
        wr = np.asarray(rotate.rotate_weight(jnp.asarray(w), b))
        np.testing.assert_allclose(xr @ wr.T, x @ w.T, atol=1e-10)
        h = x.T @ x
        np.testing.assert_allclose(
            np.asarray(rotate.rotate_gram(jnp.asarray(h), b)), xr.T @ xr, atol=1e-9
        )


def test_rotated_linear_matches_float_without_quantization_error():
    rng = np.random.default_rng(2)
    n, b = 32, 16
    w = jnp.asarray(rng.standard_normal((8, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, n)), jnp.float32)
    lin = rotate.RotatedLinear(Dense(rotate.rotate_weight(w, b)), b)
    np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(x @ w.T), rtol=1e-5, atol=1e-5)
    assert lin.in_features == n and lin.out_features == 8


def test_rotation_spreads_an_outlier_channel():
    # One channel 100x larger: after a 16-block rotation its block shares the energy evenly.
    x = np.ones((1, 16), np.float32)
    x[0, 3] = 100.0
    xr = np.asarray(rotate.rotate(jnp.asarray(x), 16))
    assert np.abs(xr).max() < 0.3 * 100.0


def test_rotated_quantlinear_runs_with_branch():
    rng = np.random.default_rng(3)
    n, b = 64, 16
    w = jnp.asarray(rng.standard_normal((16, n)), jnp.float32)
    wr = rotate.rotate_weight(w, b)
    ql = QuantLinear.from_float(wr, None, None, "nvfp4", "nvfp4")
    y = rotate.RotatedLinear(ql, b)(jnp.asarray(rng.standard_normal((3, n)), jnp.float32))
    assert y.shape == (3, 16) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize(
    "n,b,msg", [(48, 3, "power of two"), (48, 32, "does not divide"), (48, 0, "positive")]
)
def test_bad_block(n, b, msg):
    with pytest.raises(ValueError, match=msg):
        rotate.rotate(jnp.zeros((2, n)), b)
