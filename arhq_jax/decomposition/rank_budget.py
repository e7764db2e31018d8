"""Rank allocation: spread a budget of low-rank parameters over the (layer, projection) pairs
("rank allocation").

Each pair i has a free objective per candidate rank, e.g. ARHQ's tail
``J_i(r) = Σ_{j>r} σ_j²(W G̃½)`` (methods.md §2.2 step 7, an output-error estimate in the
activation-residual metric), and a cost of ``r·(in_i + out_i)`` stored factor values (bf16 B
and A). ``allocate`` solves the
multiple-choice knapsack

    min Σ_i J_i(r_i)   subject to   Σ_i cost_i(r_i) <= budget,   r_i in the candidate grid

exactly, by dynamic programming over the integer budget (a ``lax.scan`` over the pairs, then a
reverse scan to read the choice back). With the budget of uniform rank r (``uniform_budget``) and
r in the grid, the uniform choice is feasible, so the result is never worse than uniform on the
summed objective.

**A bit budget** (``allocate_bits``): the same knapsack with the budget of a target of stored
bits per weight over the pairs, B·Σ out·in less the bits every quantized weight stores anyway
(codes, block and global scales: ``weight_bits``), spent on factor values of ``factor_bits``.

``tail_objectives`` computes J_i(r) for a grid of ranks from W and G (one eigh and singular values
only; the same clamp as ``decompose.arhq``), ``svd_tail_objectives`` the SVDQuant analogue.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from arhq_jax.numerics import formats
from arhq_jax.numerics.elements import HIGHEST


@functools.partial(jax.jit, static_argnames=("budget",))
def _dp(objective, cost, budget: int):
    """objective ``[n, K]`` (inf = not allowed), cost ``[n, K]`` int32 >= 0 → choice ``[n]``."""
    n, k = objective.shape
    b = jnp.arange(budget + 1)

    def step(best, item):
        obj, c = item  # [K], [K]
        idx = b[None, :] - c[:, None]  # [K, B+1]: budget left before this item
        prev = jnp.where(idx >= 0, best[jnp.clip(idx, 0, budget)], jnp.inf)
        cand = prev + obj[:, None]
        return jnp.min(cand, axis=0), jnp.argmin(cand, axis=0).astype(jnp.int32)

    best, arg = jax.lax.scan(step, jnp.zeros(budget + 1, objective.dtype), (objective, cost))

    def back(left, item):
        a, c = item
        kk = a[left]
        return left - c[kk], kk

    _, choice = jax.lax.scan(back, jnp.int32(budget), (arg, cost), reverse=True)
    return choice, best[budget]


def allocate(objective, cost, budget: int):
    """Exact multiple-choice knapsack (see the module docstring).

    Args:
      objective: ``[n, K]`` float, the objective of pair i at candidate k; ``inf`` marks a
        candidate that is not allowed (e.g. a rank above min(out, in)).
      cost: ``[n, K]`` non-negative ints, the cost of each candidate (in any integer unit).
      budget: the total cost allowed (int >= 0; the DP is O(n·K·budget)).

    Returns:
      ``(choice [n] int32, total objective)``: the candidate index per pair; the lowest objective
      within the budget (ties go to the earliest candidates).

    Raises:
      ValueError: shapes disagree, negative costs, NaN objectives, or no feasible choice.
    """
    obj = jnp.asarray(objective, jnp.float32)
    cost = np.asarray(cost)
    if obj.ndim != 2 or cost.shape != obj.shape:
        raise ValueError(f"objective {obj.shape} and cost {cost.shape} must both be [n, K]")
    if not np.issubdtype(cost.dtype, np.integer) or (cost < 0).any():
        raise ValueError("costs must be non-negative integers")
    if bool(jnp.any(jnp.isnan(obj))):
        raise ValueError("objective contains NaN")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    choice, total = _dp(obj, jnp.asarray(cost, jnp.int32), budget=int(budget))
    if not bool(jnp.isfinite(total)):
        raise ValueError(f"no choice of candidates fits the budget {budget}")
    return np.asarray(choice), float(total)


def rank_costs(shapes, ranks) -> tuple[np.ndarray, int]:
    """Integer costs ``[n, K]`` of ``ranks`` for pairs of ``shapes`` [(out, in)], in units of
    ``g = gcd(in + out)`` factor values, and g."""
    sums = [int(o) + int(i) for o, i in shapes]
    g = functools.reduce(math.gcd, sums)
    return np.asarray([[r * s // g for r in ranks] for s in sums], np.int64), g


def uniform_budget(shapes, rank: int) -> int:
    """The budget (``rank_costs`` units) of giving every pair the same ``rank``."""
    sums = [int(o) + int(i) for o, i in shapes]
    g = functools.reduce(math.gcd, sums)
    return rank * sum(sums) // g


def allocate_ranks(objectives, shapes, ranks, rank: int) -> list[int]:
    """Ranks per pair within the budget of uniform ``rank`` (which must be in ``ranks``).

    Args:
      objectives: ``[n, K]`` J_i at each of ``ranks`` (inf where not allowed).
      shapes: n pairs ``(out, in)``; ranks: the candidate grid (ascending ints).
    """
    ranks = [int(r) for r in ranks]
    if rank not in ranks:
        raise ValueError(f"uniform rank {rank} must be one of the candidate ranks {ranks}")
    cost, _ = rank_costs(shapes, ranks)
    choice, _ = allocate(objectives, cost, uniform_budget(shapes, rank))
    return [ranks[int(k)] for k in choice]


@functools.partial(jax.jit, static_argnames=("ranks",))
def _tails(s2, ranks):
    tail = jnp.cumsum(s2[::-1])[::-1]  # tail[j] = Σ_{i>=j} σ_i²
    tail = jnp.concatenate([tail, jnp.zeros(1, tail.dtype)])
    k = s2.shape[0]
    return jnp.stack([tail[r] if r <= k else jnp.inf for r in ranks])


@jax.jit
def _arhq_sv2(w, g, eps):
    g = 0.5 * (g + g.T)
    lam, u = jnp.linalg.eigh(g)
    root = jnp.sqrt(jnp.maximum(lam, eps))
    m = jnp.matmul(w, jnp.matmul(u * root, u.T, precision=HIGHEST), precision=HIGHEST)
    return jnp.square(jnp.linalg.svd(m, compute_uv=False))


def tail_objectives(w, g, ranks, eps: float = 1e-6) -> jax.Array:
    """ARHQ's ``J(r) = Σ_{j>r} σ_j²(W G̃½)`` ``[K]`` for each r of ``ranks`` (inf where r >
    min(out, in)); G̃ clamps eigenvalues at ``eps`` (absolute), as ``decompose.arhq``."""
    w = jnp.asarray(w, jnp.float32)
    s2 = _arhq_sv2(w, jnp.asarray(g, jnp.float32), jnp.float32(eps))
    return _tails(s2, tuple(int(r) for r in ranks))


def svd_tail_objectives(w, ranks) -> jax.Array:
    """SVDQuant's ``Σ_{j>r} σ_j²(W)`` ``[K]`` for each r of ``ranks``."""
    s2 = jnp.square(jnp.linalg.svd(jnp.asarray(w, jnp.float32), compute_uv=False))
    return _tails(s2, tuple(int(r) for r in ranks))


# ----------------------------------------------------------------------------- a bit budget


def weight_bits(shape, w_fmt, *, act_scale: bool = False, smooth: bool = False, bias_bits=0):
    """Stored bits of one quantized projection ``[out, in]`` without its branch: the codes,
    block scales, zero points and tensor scale of ``w_fmt`` (their shapes and dtypes from
    ``jax.eval_shape(formats.quantize)``, as the checkpoint stores them), plus a 32-bit static
    activation scale (``act_scale``), an f32 smoothing vector ``[in]`` (``smooth``) and
    ``bias_bits`` (``out`` × the bias dtype's bits, or 0)."""
    out_f, in_f = (int(v) for v in shape)
    qt = jax.eval_shape(
        lambda w: formats.quantize(w, w_fmt), jax.ShapeDtypeStruct((out_f, in_f), jnp.float32)
    )
    bits = sum(8 * math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(qt))
    return int(bits) + 32 * bool(act_scale) + 32 * in_f * bool(smooth) + int(bias_bits)


def bits_per_weight(shapes, fixed_bits, ranks, factor_bits: int) -> float:
    """Stored bits per weight of projections ``shapes`` [(out, in)] with ``fixed_bits`` each
    (``weight_bits``) and rank-``ranks`` factors B ``[out, r]``, A ``[in, r]`` of
    ``factor_bits``."""
    total = sum(int(f) + int(r) * (int(o) + int(i)) * int(factor_bits)
                for (o, i), f, r in zip(shapes, fixed_bits, ranks, strict=True))  # fmt: skip
    return total / sum(int(o) * int(i) for o, i in shapes)


def bits_budget(shapes, fixed_bits, factor_bits: int, bits_target: float) -> int:
    """The budget (``rank_costs`` units of g factor values) left for the factors when the
    stored bits per weight must be at most ``bits_target``: ⌊(B·Σ out·in − Σ fixed) /
    (factor_bits·g)⌋, computed exactly (``Fraction``). ValueError when the weights without any
    branch already exceed B."""
    if isinstance(bits_target, bool) or not isinstance(bits_target, (int, float)):
        raise ValueError(f"bits target must be a number, got {bits_target!r}")
    if not math.isfinite(bits_target) or bits_target <= 0:
        raise ValueError(f"bits target must be a finite number > 0, got {bits_target}")
    n = sum(int(o) * int(i) for o, i in shapes)
    fixed = sum(int(f) for f in fixed_bits)
    spare = Fraction(bits_target) * n - fixed
    if spare < 0:
        raise ValueError(
            f"bits target {bits_target:g} is below the {fixed / n:.4f} bits per weight that the "
            "quantized weights store without a low-rank branch"
        )
    g = functools.reduce(math.gcd, [int(o) + int(i) for o, i in shapes])
    return int(spare // (int(factor_bits) * g))


def allocate_bits(objectives, shapes, ranks, fixed_bits, factor_bits: int, bits_target: float):
    """Ranks per pair minimising Σ J_i(r_i) with at most ``bits_target`` stored bits per weight
    over all pairs (``bits_budget``; the exact knapsack of ``allocate``).

    Args:
      objectives: ``[n, K]`` J_i at each of ``ranks`` (inf where not allowed; rank 0 must be
        allowed, so that the all-zero choice is feasible).
      shapes: n pairs ``(out, in)``; ranks: the candidate grid (ints, 0 first).
      fixed_bits: n ints, each pair's stored bits without a branch (``weight_bits``).
      factor_bits: bits of one stored factor value (16 for bf16).
    Returns:
      ``list[int]``, one rank per pair.
    """
    ranks = [int(r) for r in ranks]
    if len(fixed_bits) != len(shapes):
        raise ValueError(f"{len(fixed_bits)} fixed bit counts for {len(shapes)} pairs")
    cost, _ = rank_costs(shapes, ranks)
    budget = bits_budget(shapes, fixed_bits, factor_bits, bits_target)
    choice, _ = allocate(objectives, cost, budget)
    return [ranks[int(k)] for k in choice]
