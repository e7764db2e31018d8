"""Rank allocation (arhq_jax.decomposition.rank_budget): exact against brute force, never worse
than uniform."""

import itertools

import numpy as np
import pytest

from arhq_jax.decomposition import rank_budget as RB


def _brute(obj, cost, budget):
    best = np.inf
    for combo in itertools.product(range(obj.shape[1]), repeat=obj.shape[0]):
        c = sum(cost[i, k] for i, k in enumerate(combo))
        if c <= budget:
            best = min(best, sum(obj[i, k] for i, k in enumerate(combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = 4, 4
    # Decreasing, not necessarily convex objectives (a knapsack, not a greedy problem).
    obj = np.sort(rng.uniform(0, 10, (n, k)), axis=1)[:, ::-1].astype(np.float32)
    unit = rng.integers(1, 5, n)
    cost = unit[:, None] * np.arange(k)[None, :]
    budget = int(rng.integers(0, cost.sum(1).max() * 2))
    choice, total = RB.allocate(obj, cost, budget)
    assert sum(cost[i, c] for i, c in enumerate(choice)) <= budget
    np.testing.assert_allclose(total, sum(obj[i, c] for i, c in enumerate(choice)), rtol=1e-5)
    np.testing.assert_allclose(total, _brute(obj, cost, budget), rtol=1e-5)


def test_allocate_never_worse_than_uniform_on_spectra():
    rng = np.random.default_rng(0)
    shapes = [(48, 32), (16, 32), (32, 80), (80, 32), (32, 32)]
    ranks = [0, 4, 8, 12, 16]
    objs = []
    for j, (o, i) in enumerate(shapes):
        s2 = np.sort(rng.exponential(size=min(o, i)))[::-1] * 10.0 ** (2 - j)
        tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
        objs.append([tail[r] for r in ranks])
    objs = np.asarray(objs, np.float32)
    got = RB.allocate_ranks(objs, shapes, ranks, 8)
    cost, _ = RB.rank_costs(shapes, ranks)
    k = [ranks.index(r) for r in got]
    uniform = objs[:, ranks.index(8)].sum()
    assert sum(cost[j, kk] for j, kk in enumerate(k)) <= RB.uniform_budget(shapes, 8)
    assert sum(objs[j, kk] for j, kk in enumerate(k)) <= uniform * (1 + 1e-6)
    assert got != [8] * len(shapes)  # these spectra differ enough that uniform is not optimal


def test_tail_objectives_match_numpy_float64():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 20))
    x = rng.standard_normal((200, 20)) * np.exp(rng.standard_normal(20))
    g = x.T @ x / 200
    lam, u = np.linalg.eigh(g)
    m = w @ (u * np.sqrt(np.maximum(lam, 1e-6))) @ u.T
    s2 = np.linalg.svd(m, compute_uv=False) ** 2
    ranks = (0, 3, 12, 13)
    got = np.asarray(RB.tail_objectives(w, g, ranks))
    np.testing.assert_allclose(got[:3], [s2[r:].sum() for r in ranks[:3]], rtol=1e-4, atol=1e-4)
    assert np.isinf(got[3])
    got = np.asarray(RB.svd_tail_objectives(w, (0, 5)))
    s2w = np.linalg.svd(w, compute_uv=False) ** 2
    np.testing.assert_allclose(got, [s2w.sum(), s2w[5:].sum()], rtol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="must both be"):
        RB.allocate(np.zeros((2, 3)), np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError, match="non-negative"):
        RB.allocate(np.zeros((2, 2)), -np.ones((2, 2), int), 3)
    with pytest.raises(ValueError, match="fits the budget"):
        RB.allocate(np.zeros((1, 1)), np.full((1, 1), 5), 3)
    with pytest.raises(ValueError, match="candidate ranks"):
        RB.allocate_ranks(np.zeros((1, 2)), [(4, 4)], [0, 2], 1)


# ----------------------------------------------------------------------------- a bit budget


def _bpw(shapes, fixed, ranks, fbits):
    """Stored bits per weight counted by hand (exact, in integers)."""
    tot = sum(f + r * (o + i) * fbits for (o, i), f, r in zip(shapes, fixed, ranks, strict=True))
    return tot, sum(o * i for o, i in shapes)


@pytest.mark.parametrize("seed", range(5))
def test_allocate_bits_equals_brute_force(seed):
    """The lowest Σ J over every rank choice whose stored bits per weight are <= B (brute force
    over all 4^4 choices), and the DP's choice is within B."""
    rng = np.random.default_rng(seed)
    shapes = [(48, 32), (16, 32), (32, 80), (64, 32)]
    ranks = [0, 4, 8, 12]
    fixed = [int(o * i * 4.5) + 64 for o, i in shapes]
    obj = np.sort(rng.uniform(0, 10, (4, 4)), axis=1)[:, ::-1].astype(np.float32)
    fb = 16
    base = sum(fixed) / sum(o * i for o, i in shapes)
    target = float(base + rng.uniform(0.1, 3.0))
    got = RB.allocate_bits(obj, shapes, ranks, fixed, fb, target)
    tot, n = _bpw(shapes, fixed, got, fb)
    assert tot <= target * n
    best = np.inf
    for combo in itertools.product(range(4), repeat=4):
        t, _ = _bpw(shapes, fixed, [ranks[k] for k in combo], fb)
        if t <= target * n:
            best = min(best, sum(float(obj[i, k]) for i, k in enumerate(combo)))
    mine = sum(float(obj[i, ranks.index(r)]) for i, r in enumerate(got))
    np.testing.assert_allclose(mine, best, rtol=1e-6)
    assert RB.bits_per_weight(shapes, fixed, got, fb) == tot / n


def test_bits_budget_is_exact_at_the_boundary():
    shapes = [(16, 16), (16, 48)]  # in + out: 32, 64 -> g = 32
    fixed = [1000, 3000]
    n = 16 * 16 + 16 * 48
    # exactly room for 5 units of 32 bf16 values: B·n = 4000 + 5·32·16
    b = (4000 + 5 * 32 * 16) / n
    assert RB.bits_budget(shapes, fixed, 16, b) == 5
    assert RB.bits_budget(shapes, fixed, 16, np.nextafter(b, 0)) == 4
    with pytest.raises(ValueError, match="below the 3.9062 bits per weight"):
        RB.bits_budget(shapes, fixed, 16, 3.5)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="bits target must be"):
            RB.bits_budget(shapes, fixed, 16, bad)


def test_weight_bits_counts_the_stored_arrays():
    # nvfp4: 4-bit codes, an E4M3 scale per 16, an f32 global scale (+ the static act scale)
    assert RB.weight_bits((64, 96), "nvfp4") == 64 * 96 * 4 + 64 * 6 * 8 + 32
    assert RB.weight_bits((64, 96), "nvfp4", act_scale=True) == 64 * 96 * 4 + 64 * 6 * 8 + 64
    # smoothing vector f32 [in], a bf16 bias [out]
    assert RB.weight_bits((64, 96), "nvfp4", smooth=True, bias_bits=64 * 16) == (
        64 * 96 * 4 + 64 * 6 * 8 + 32 + 96 * 32 + 64 * 16
    )
    # mxfp4: an E8M0 scale per 32; K padded to the block
    assert RB.weight_bits((8, 40), "mxfp4") - 32 == 8 * 64 * 4 + 8 * 2 * 8
