"""Layer SNR (docs/spec/methods.md §2.4): each quantized projection's output against the float one.

On held-out tokens, the unquantized model runs layer by layer; each quantized projection and its
float original read the *same* input X (the float model's), and

    SNR = 20·log10(‖Y‖_F / max(‖Ŷ − Y‖_F, 1e−12)),   Y = X Wᵀ in f32,

over the whole ``[N_eval, out]`` block. The baseline is RTN in the same setting: Q_a(X/s)·Q_w(W s)ᵀ
with the method's own smoothing s and no branch. The sums of squares are streamed, so the eval
block never has to fit in memory at once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from arhq_jax.calibration.calibrate import LayerwiseRunner, replicate
from arhq_jax.linears.base import Dense
from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.models.config import GROUP_OF, PROJECTIONS, ModelConfig, Params
from arhq_jax.numerics.elements import HIGHEST


def rtn_baseline(fp: Dense, quant, w_fmt, act_fmt) -> QuantLinear:
    """RTN in the same setting as ``quant``: its smoothing scale (if any) and its static nvfp4
    activation scale (if any: the baseline's quantizer reads the same x/s), no branch."""
    s = getattr(quant, "smooth", None)
    act_scale = quant.act_scale if isinstance(quant, QuantLinear) else None
    w = fp.w.astype(jnp.float32)
    w_t = w if s is None else w * s[None, :]
    return QuantLinear.from_float(w_t, None, None, w_fmt, act_fmt, smooth=s, act_scale=act_scale)


@functools.partial(jax.jit)
def _sums(fp: Dense, quant, base, x, mask):
    """``(Σ‖Y‖², Σ‖Ŷ−Y‖², Σ‖Ŷ_base−Y‖²)`` over the real tokens of one batch."""
    x = x.astype(jnp.float32)
    y = jnp.einsum("...k,nk->...n", x, fp.w.astype(jnp.float32), precision=HIGHEST)
    m = mask[..., None].astype(jnp.float32)
    sq = lambda z: jnp.sum(jnp.square(z) * m)  # noqa: E731
    return jnp.stack([sq(y), sq(quant(x) - y), sq(base(x) - y)])


def layer_snr(
    fp_params: Params,
    q_params: Params,
    cfg: ModelConfig,
    eval_ids,
    *,
    w_fmt,
    act_fmt,
    batch_size: int = 4,
    mesh=None,
    progress: bool = True,
) -> list[dict]:
    """SNR (dB) of every quantized (layer, projection) of ``q_params`` on ``eval_ids [S, L]``.

    Returns one dict per pair: ``layer``, ``proj``, ``snr_db``, ``baseline_db`` (RTN, same
    setting) and ``gain_db``. Projections left in float are skipped.
    """
    runner = LayerwiseRunner(fp_params, cfg, eval_ids, batch_size=batch_size, mesh=mesh)
    rows = []
    for li in tqdm(range(cfg.num_layers), desc="layer SNR", unit="layer", disable=not progress):
        fp_layer, q_layer = fp_params.layers[li], q_params.layers[li]
        pairs = {
            p: (getattr(fp_layer, p), getattr(q_layer, p))
            for p in PROJECTIONS
            if not isinstance(getattr(q_layer, p), Dense)
        }
        bases = {p: rtn_baseline(f, q, w_fmt, act_fmt) for p, (f, q) in pairs.items()}
        pairs, bases = replicate((pairs, bases), runner.mesh)
        acc = {p: np.zeros(3) for p in pairs}
        for captured, mask in runner.captures(fp_layer):
            for p, (f, q) in pairs.items():
                acc[p] += np.asarray(_sums(f, q, bases[p], captured[GROUP_OF[p]], mask), np.float64)
        for p, (y2, e2, b2) in acc.items():
            snr = _db(y2, e2)
            base = _db(y2, b2)
            rows.append(
                {"layer": li, "proj": p, "snr_db": snr, "baseline_db": base, "gain_db": snr - base}
            )
        runner.advance(fp_layer)
    return rows


def _db(y2: float, e2: float) -> float:
    return 10.0 * math.log10(y2 / max(e2, 1e-24))
