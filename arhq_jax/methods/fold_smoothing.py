"""Exportable smoothing: one vector per input group, folded into the layer's producers.

The smooth setting divides each projection's input by its own vector s at run time, which no
serving layout can store. Here the vector is shared by every consumer of one input and folded
into the weight that produces that input, so the quantized model is a plain Llama/Qwen3 with
changed norm weights and v/up rows (``setting="fold"`` of the low-rank methods):

  group     consumers      producer, folded offline            consumers
  qkv       q, k, v        input_layernorm  γ ← γ / s          W ← W diag(s)
  gate_up   gate, up       post_attention_layernorm  γ ← γ / s  W ← W diag(s)
  o         o              v_proj rows  W_v ← diag(1/s_kv) W_v  W_o ← W_o diag(s)
  down      down           up_proj rows W_up ← diag(1/s) W_up   W_d ← W_d diag(s)

**GQA.** o_proj's input channel c = h·d + j (query head h, head channel j) is the attention of
head h over the values of v row ``kv(h)·d + j``, kv(h) = h // (num_heads / num_kv_heads), and
the attention is linear in the values. Dividing that v row by t scales channel c of *every*
query head sharing kv(h) by 1/t. So a vector s on o_proj's input folds into v exactly iff
``s[h·d + j]`` is the same for all h with the same kv(h): s = expand(s_kv). The search makes
it so by forming s from the max of m_x and of m_w over each such set of channels
(``smoothquant.gqa_group_max``).

**down.** ``silu(gate) ⊙ up`` is linear in up's output, so dividing up's row i (and its bias) by
s_i divides down's input channel i by s_i.

**The α search** (SmoothQuant's, as ``decompose.update_alpha_search`` but per group): for each α
of the 21-point grid, s_α = m_x^α / m_w^(1−α) with m_w the absmax over the group's consumers
stacked along ``out``, and the error ``Σ_t ‖Q_a(x_t/s_α) Q_w(W_grp diag s_α)ᵀ − x_t W_grpᵀ‖²``
of the stacked weight (whose nvfp4 global scale is the fused one the runtime uses), with the static
activation scale of ``max_j m_x[j]/s_α[j]`` when the recipe's scales are static. The vectors are
chosen on the float layer, before any of its projections is quantized (v and up are producers
of later groups); everything after (the branch, the GPTQ residual, the scale search, the
refinement) runs on the folded layer as in the raw setting, i.e. in the smoothed space.

s is clamped to [``S_MIN``, ``S_MAX``] so that the folded weights stay in the range a checkpoint
accepts (a dead input channel, m_x = 0, would otherwise get s → 0 and γ / s → ∞).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

import arhq_jax.methods.smoothquant as smoothquant
from arhq_jax.calibration import stats
from arhq_jax.decomposition.decompose import ALPHAS, SCALE_FLOOR, select_alpha
from arhq_jax.models.config import INPUT_GROUPS, Layer, ModelConfig
from arhq_jax.numerics.elements import HIGHEST
from arhq_jax.numerics.formats import fake_quant, nvfp4_tensor_scale, resolve_format

FOLD_GROUPS = tuple(INPUT_GROUPS)  # qkv, o, gate_up, down
S_MIN, S_MAX = 1e-4, 1e4


def _check_group(group: str) -> None:
    if group not in INPUT_GROUPS:
        raise ValueError(f"unknown input group {group!r}; supported: {', '.join(INPUT_GROUPS)}")


def group_weight(layer: Layer, group: str) -> jax.Array:
    """The group's consumers stacked along ``out``: ``[Σ out, in]`` (f32 or wider)."""
    _check_group(group)
    ws = [getattr(layer, p).w for p in INPUT_GROUPS[group]]
    dt = jnp.promote_types(ws[0].dtype, jnp.float32)
    return jnp.concatenate([w.astype(dt) for w in ws], axis=0)


def tie_gqa(v, cfg: ModelConfig) -> jax.Array:
    """``[num_heads·d]`` → the max over the query heads sharing a KV head, repeated back."""
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return smoothquant.expand_kv_to_heads(smoothquant.gqa_group_max(v, nh, nkv, d), nh, nkv, d)


def scale_stats(layer: Layer, cfg: ModelConfig, group: str, m_x) -> tuple[jax.Array, jax.Array]:
    """``(m_x, m_w)`` ``[in]`` the group's vector is formed from: m_w the absmax of the stacked
    consumers; for ``o`` both tied over the query heads of each KV head (``tie_gqa``)."""
    m_w = jnp.max(jnp.abs(group_weight(layer, group)), axis=0)
    m_x = jnp.asarray(m_x)
    if m_x.shape != m_w.shape:
        raise ValueError(f"m_x of group {group} must be [{m_w.shape[0]}], got {m_x.shape}")
    if group == "o":
        m_x, m_w = tie_gqa(m_x, cfg), tie_gqa(m_w, cfg)
    return m_x, m_w


def scales(m_x, m_w, alpha) -> jax.Array:
    """``s = clip(max(m_x, 1e-12)^α / max(m_w, 1e-12)^(1−α), S_MIN, S_MAX)`` ``[in]`` (the
    dtype of m_x, f32 or wider); α scalar or ``[K]`` (then ``[K, in]``)."""
    m_x, m_w = jnp.asarray(m_x), jnp.asarray(m_w)
    dt = jnp.promote_types(m_x.dtype, jnp.float32)
    m_x = jnp.maximum(m_x.astype(dt), SCALE_FLOOR)
    m_w = jnp.maximum(m_w.astype(dt), SCALE_FLOOR)
    a = jnp.asarray(alpha, dt)[..., None]
    s = jnp.power(m_x, a) / jnp.power(m_w, 1.0 - a)
    return jnp.clip(s, S_MIN, S_MAX).reshape(jnp.shape(alpha) + m_x.shape)


def candidate_scales(layer: Layer, cfg: ModelConfig, group: str, m_x) -> jax.Array:
    """``[21, in]`` f32: the group's s for every α of ``ALPHAS``."""
    sx, sw = scale_stats(layer, cfg, group, m_x)
    return scales(sx, sw, jnp.asarray(ALPHAS, jnp.float32)).astype(jnp.float32)


@struct.dataclass
class ScaleSearch:
    """Streaming state: ``errors [K]`` (Σ_t squared output error per candidate) and ``count``."""

    errors: jax.Array
    count: jax.Array


def init_search(k: int = len(ALPHAS)) -> ScaleSearch:
    return ScaleSearch(jnp.zeros(k, jnp.float32), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("w_fmt", "act_fmt", "static_act"))
def _update(state, x, w, cand, m_x, mask, w_fmt, act_fmt, static_act):
    d = w.shape[1]
    x = x.reshape(-1, d).astype(jnp.float32)
    if mask is not None:  # zero rows: no error, no effect on a dynamic scale
        x = jnp.where(mask.reshape(-1, 1), x, 0.0)
    w = w.astype(jnp.float32)
    y = jnp.matmul(x, w.T, precision=HIGHEST)

    def err(s):
        ts = nvfp4_tensor_scale(jnp.max(m_x / s)) if static_act else None
        xs = x / s
        xq = xs if act_fmt is None else fake_quant(xs, act_fmt, tensor_scale=ts)
        wq = fake_quant(w * s, w_fmt)
        return jnp.sum(jnp.square(jnp.matmul(xq, wq.T, precision=HIGHEST) - y))

    errs = jax.lax.map(err, cand)  # one quantized copy of W alive at a time
    n = x.shape[0] if mask is None else jnp.sum(mask)
    return ScaleSearch(state.errors + errs, state.count + n)


def update_search(
    state: ScaleSearch, x, w, cand, m_x, w_fmt, act_fmt, *, mask=None, static_act_scale=False
) -> ScaleSearch:
    """Add one chunk's error of every candidate vector.

    Args:
      x: ``[..., in]`` the group's (unsmoothed) input tokens; mask: ``x.shape[:-1]`` bool.
      w: ``[Σ out, in]`` the stacked consumers (``group_weight``).
      cand: ``[K, in]`` candidate vectors s (``candidate_scales``).
      m_x: ``[in]`` the calibration absmax of x (the static activation amax of x/s is
        ``max_j m_x[j]/s[j]``).
      w_fmt, act_fmt: the weight and activation formats (``act_fmt`` None: weight-only); the
        weight quantizer runs in 1-D blocks along ``in`` (as the smooth setting's search).
      static_act_scale: nvfp4 activations with the calibrated static scale.
    """
    w_spec = resolve_format(w_fmt)
    if w_spec.tile is not None:
        w_spec = resolve_format(w_spec, tile=None)
    a_spec = None if act_fmt is None else resolve_format(act_fmt)
    static = bool(static_act_scale) and a_spec is not None and a_spec.name == "nvfp4"
    cand, m_x = jnp.asarray(cand, jnp.float32), jnp.asarray(m_x, jnp.float32)
    if cand.ndim != 2 or cand.shape[1] != w.shape[1] or m_x.shape != (w.shape[1],):
        raise ValueError(f"cand {cand.shape} and m_x {m_x.shape} must be [K, {w.shape[1]}]")
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    return _update(state, jnp.asarray(x), w, cand, m_x, mask, w_spec, a_spec, static)


def search(calib, layer: Layer, groups, qcfg) -> dict[str, tuple[float, jax.Array]]:
    """``{group: (α*, s [in] f32)}`` for ``groups`` of ``layer``: one absmax pass, then the α
    search over the calibration inputs (the first ``qcfg.alpha_tokens`` tokens when set)."""
    cfg = calib.cfg
    spec = stats.StatsConfig(act_fmt=None, keep_absmax=True, dtype=qcfg.stats_dtype)
    am = calib.stats(layer, {g: spec for g in groups})
    m_x = {g: jnp.asarray(am[g]["absmax"], jnp.float32) for g in groups}
    cand = {g: candidate_scales(layer, cfg, g, m_x[g]) for g in groups}
    ws = {g: group_weight(layer, g).astype(jnp.float32) for g in groups}
    limit = getattr(qcfg, "alpha_tokens", None)

    def update(name, state, x, mask):
        if limit is not None and int(state.count) >= limit:
            return state
        return update_search(
            state,
            x,
            ws[name],
            cand[name],
            m_x[name],
            qcfg.w_spec,
            qcfg.act_spec,
            mask=mask,
            static_act_scale=qcfg.static_act_scale,
        )

    found = calib.runner.accumulate(layer, {g: init_search() for g in groups}, update)
    out = {}
    for g, st in found.items():
        k = ALPHAS.index(select_alpha(st.errors))
        out[g] = (ALPHAS[k], cand[g][k])
    return out


def _kv_vector(s_o, cfg: ModelConfig) -> jax.Array:
    """``[num_heads·d]`` → ``[num_kv_heads·d]``; refuses a vector not tied over GQA groups."""
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s_o = jnp.asarray(s_o)
    if s_o.shape != (nh * d,):
        raise ValueError(f"o_proj's vector must be [{nh * d}], got {s_o.shape}")
    per = s_o.reshape(nkv, nh // nkv, d)
    if not bool(jnp.all(per == per[:, :1])):
        raise ValueError(
            "o_proj's smoothing vector differs between query heads that share a KV head; "
            "it cannot be folded into v_proj's rows"
        )
    return per[:, 0].reshape(-1)


def _scale_cols(lin, s):
    dt = jnp.promote_types(lin.w.dtype, jnp.float32)
    return lin.replace(w=(lin.w.astype(dt) * s.astype(dt)[None, :]).astype(lin.w.dtype))


def _divide_rows(lin, s):
    dt = jnp.promote_types(lin.w.dtype, jnp.float32)
    w = (lin.w.astype(dt) / s.astype(dt)[:, None]).astype(lin.w.dtype)
    b = getattr(lin, "b", None)
    if b is not None:
        b = (b.astype(dt) / s.astype(dt)).astype(b.dtype)
        return lin.replace(w=w, b=b)
    return lin.replace(w=w)


def _divide_norm(g, s):
    dt = jnp.promote_types(g.dtype, jnp.float32)
    return (g.astype(dt) / s.astype(dt)).astype(g.dtype)


def fold_layer(layer: Layer, cfg: ModelConfig, vectors: dict) -> Layer:
    """The float layer with ``vectors`` = {group: s [in of the group]} folded in (module
    docstring); computes the same function up to rounding (in f32, or f64 for f64 params).
    Needs float linears (``Dense``): fold before quantizing."""
    for g, s in vectors.items():
        _check_group(g)
        s = jnp.asarray(s)
        want = getattr(layer, INPUT_GROUPS[g][0]).w.shape[1]
        if s.shape != (want,):
            raise ValueError(f"the vector of group {g} must be [{want}], got {s.shape}")
        if not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
            raise ValueError(f"the vector of group {g} must be finite and positive")
    new = {}
    if "qkv" in vectors:
        s = jnp.asarray(vectors["qkv"])
        new["input_norm"] = _divide_norm(layer.input_norm, s)
        for p in INPUT_GROUPS["qkv"]:
            new[p] = _scale_cols(getattr(layer, p), s)
    if "o" in vectors:
        s = jnp.asarray(vectors["o"])
        new["v_proj"] = _divide_rows(new.get("v_proj", layer.v_proj), _kv_vector(s, cfg))
        new["o_proj"] = _scale_cols(layer.o_proj, s)
    if "gate_up" in vectors:
        s = jnp.asarray(vectors["gate_up"])
        new["post_norm"] = _divide_norm(layer.post_norm, s)
        for p in INPUT_GROUPS["gate_up"]:
            new[p] = _scale_cols(getattr(layer, p), s)
    if "down" in vectors:
        s = jnp.asarray(vectors["down"])
        new["up_proj"] = _divide_rows(new.get("up_proj", layer.up_proj), s)
        new["down_proj"] = _scale_cols(layer.down_proj, s)
    return layer.replace(**new)


def fold_searched(layer: Layer, calib, qcfg) -> tuple[Layer, dict]:
    """The layer's groups of ``qcfg`` searched (``search``) and folded (``fold_layer``):
    ``(folded layer, {proj: {"alpha": α*}})``."""
    found = search(calib, layer, qcfg.groups, qcfg)
    folded = fold_layer(layer, calib.cfg, {g: s for g, (_, s) in found.items()})
    info = {p: {"alpha": a} for g, (a, _) in found.items() for p in INPUT_GROUPS[g]}
    return folded, info
