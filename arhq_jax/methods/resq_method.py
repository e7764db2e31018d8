"""ResQ on whole models (docs/spec/methods.md §8): the model-level fusions around ``resq``'s
per-linear
pieces, as a layer quantizer of ``arhq_jax.run.quantize``.

``prepare`` (before the layer loop, on the float model):
  1. Untie the embeddings (``lm_head = Dense(embed)``) and fuse every RMSNorm γ into the linears
     that read it (q/k/v, gate/up, lm_head); the norms become ones.
  2. One calibration pass: H = E[x xᵀ] of the q/k/v and gate/up inputs of every layer, and E[x]
     of the q/k/v input (for a v bias).
  3. ``full_shared`` basis: U_A = P·blockdiag(R_low, R_high) from (ΣH_attn + ΣH_mlp)/(2L); the
     high subspace is the last d/8 columns. Per layer and KV head, U_V from the second moment of
     v = x W_vᵀ (+ b), i.e. W_v H W_vᵀ, with its last head_dim/8 columns high. The Haar rotations
     are drawn once (``qcfg.seed``) and shared by all layers and heads.
  4. Rotate: embed ← embed·U_A, q/k/v/gate/up/lm_head ← W·U_A (input columns), o/down ← U_Aᵀ·W
     (output rows and biases), v rows and o columns per head by U_V. RMSNorm with γ = 1 commutes
     with an orthogonal U_A, so the unquantized rotated model computes the same logits.

``quantize_stage``: per projection a packed ``ResQLinear``: q/k/v/gate/up with the last d/8 input
columns in int8 (weights per row, sym; activations per token, asym, a separate scale for the
two parts); o_proj with an online gather moving each head's d/8 high dims to the end (the
reference's rearrangement) and per-head activation groups; down_proj all 4-bit behind an online
Hadamard of its input. Weights by GPTQ on H of the rotated input with QuaRot's MSE clip
(``residual_quant="rtn"``: RTN with the same clip).

Not expressible with the model port (the model code never looks inside a linear): the online
U_K rotation of q and k after RoPE and the KV-cache quantization (K after RoPE, V per head); the
KV cache stays in the compute dtype, as for every other method here.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import arhq_jax.methods.resq as resq
from arhq_jax.calibration.calibrate import Calibration, LayerwiseRunner
from arhq_jax.calibration.stats import StatsConfig
from arhq_jax.linears.base import Dense
from arhq_jax.methods.base import (
    GPTQ_CORE_OPTIONS,
    GPTQCoreOptions,
    Method,
    MethodFormats,
    check_residual_quant,
    option,
)
from arhq_jax.models.config import GROUP_OF
from arhq_jax.numerics import formats as F
from arhq_jax.numerics.elements import HIGHEST

HIGH_FRAC = 1 / 8


def _mm(a, b):
    return jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=HIGHEST)


def _cast(x, like):
    return None if x is None else jnp.asarray(x).astype(jnp.asarray(like).dtype)


def fuse_norms(params, cfg):
    """Untie the embeddings and fold each RMSNorm γ into the linears reading it (γ ← 1)."""
    head = params.lm_head if params.lm_head is not None else Dense(params.embed)

    def scale_in(lin, g):
        return lin.replace(w=_cast(lin.w.astype(jnp.float32) * g[None, :], lin.w))

    layers = []
    for ly in params.layers:
        g_in = ly.input_norm.astype(jnp.float32)
        g_post = ly.post_norm.astype(jnp.float32)
        layers.append(
            ly.replace(
                q_proj=scale_in(ly.q_proj, g_in),
                k_proj=scale_in(ly.k_proj, g_in),
                v_proj=scale_in(ly.v_proj, g_in),
                gate_proj=scale_in(ly.gate_proj, g_post),
                up_proj=scale_in(ly.up_proj, g_post),
                input_norm=jnp.ones_like(ly.input_norm),
                post_norm=jnp.ones_like(ly.post_norm),
            )
        )
    g_f = params.final_norm.astype(jnp.float32)
    return params.replace(
        layers=tuple(layers),
        lm_head=scale_in(head, g_f),
        final_norm=jnp.ones_like(params.final_norm),
    )


def collect_moments(params, cfg, calib_ids, stats_dtype="float32", batch_size=8):
    """Per layer, H of the q/k/v and gate/up inputs and E[x] of the q/k/v input (float model)."""
    runner = LayerwiseRunner(params, cfg, calib_ids, batch_size=batch_size)
    spec_qkv = StatsConfig(keep_absmax=False, keep_h=True, keep_moments=True, dtype=stats_dtype)
    spec_gu = StatsConfig(keep_absmax=False, keep_h=True, dtype=stats_dtype)
    calib = Calibration(runner, cfg)
    out = []
    for layer in params.layers:
        st = calib.stats(layer, {"qkv": spec_qkv, "gate_up": spec_gu})
        out.append(jax.tree.map(lambda a: np.asarray(a, np.float64), st))
        runner.advance(layer)
    return out


def resq_bases(moments, params, cfg, key):
    """``(U_A: ResQRotation, U_V: [layers][kv heads] ResQRotation)`` from ``collect_moments``."""
    h_a = sum(m["qkv"]["H"] + m["gate_up"]["H"] for m in moments) / (2 * len(moments))
    k_a, k_v = jax.random.split(key)
    u_a = resq.resq_rotation(h_a, k_a, high_frac=HIGH_FRAC)
    d = cfg.head_dim
    u_v = []
    for m, ly in zip(moments, params.layers, strict=True):
        wv = np.asarray(ly.v_proj.w, np.float64)
        h, mean = m["qkv"]["H"], m["qkv"]["mean"]
        hv = wv @ h @ wv.T
        if ly.v_proj.b is not None:  # E[(Wx + b)(Wx + b)ᵀ]
            b = np.asarray(ly.v_proj.b, np.float64)
            wm = wv @ mean
            hv = hv + np.outer(wm, b) + np.outer(b, wm) + np.outer(b, b)
        u_v.append(
            [
                resq.resq_rotation(
                    hv[j * d : (j + 1) * d, j * d : (j + 1) * d], k_v, high_frac=HIGH_FRAC
                )
                for j in range(cfg.num_kv_heads)
            ]
        )
    return u_a, u_v


def rotate_params(params, cfg, u_a, u_v):
    """Fuse U_A into the residual stream and U_V into each head's v rows and o columns."""
    u = u_a.u
    d, nkv, nh = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    rep = nh // nkv

    def rot_in(lin):
        return lin.replace(w=_cast(_mm(lin.w, u), lin.w))

    def rot_out(lin, w=None):
        w = lin.w if w is None else w
        b = None if lin.b is None else _cast(_mm(lin.b, u), lin.b)
        return lin.replace(w=_cast(_mm(u.T, w), lin.w), b=b)

    layers = []
    for ly, uv in zip(params.layers, u_v, strict=True):
        v = rot_in(ly.v_proj)
        wv, bv = v.w.astype(jnp.float32), v.b
        wv = jnp.concatenate([_mm(uv[j].u.T, wv[j * d : (j + 1) * d]) for j in range(nkv)])
        if bv is not None:
            bv32 = bv.astype(jnp.float32)
            bv = _cast(
                jnp.concatenate([_mm(bv32[j * d : (j + 1) * d], uv[j].u) for j in range(nkv)]), bv
            )
        wo = ly.o_proj.w.astype(jnp.float32)
        wo = jnp.concatenate(
            [_mm(wo[:, j * d : (j + 1) * d], uv[j // rep].u) for j in range(nh)], 1
        )
        layers.append(
            ly.replace(
                q_proj=rot_in(ly.q_proj),
                k_proj=rot_in(ly.k_proj),
                v_proj=v.replace(w=_cast(wv, ly.v_proj.w), b=bv),
                o_proj=rot_out(ly.o_proj, wo),
                gate_proj=rot_in(ly.gate_proj),
                up_proj=rot_in(ly.up_proj),
                down_proj=rot_out(ly.down_proj),
            )
        )
    return params.replace(
        embed=_cast(_mm(params.embed, u), params.embed),
        layers=tuple(layers),
        lm_head=rot_in(params.lm_head),
    )


def o_proj_perm(cfg, n_high_v: int) -> np.ndarray:
    """o_proj input order: every head's low dims, then every head's last ``n_high_v`` dims."""
    d, nh = cfg.head_dim, cfg.num_heads
    idx = np.arange(nh * d).reshape(nh, d)
    return np.concatenate([idx[:, : d - n_high_v].ravel(), idx[:, d - n_high_v :].ravel()])


@dataclasses.dataclass(frozen=True)
class ResQOptions(GPTQCoreOptions):
    residual_quant: str = option(
        "gptq", "quantizer of ResQ's weights: rtn or gptq", choices=("rtn", "gptq")
    )
    mse_clip: bool = option(
        True,
        "QuaRot's MSE clip of per-row int weight scales in GPTQ",
        action="BooleanOptionalAction",
    )
    seed: int = option(0, "seed of the token sampling (AWQ) or the rotations (ResQ)", type=int)

    def check(self, common) -> None:
        check_residual_quant(self.residual_quant)
        GPTQCoreOptions.check(self, common)

    def unused(self, common) -> tuple[str, ...]:
        # With RTN the MSE clip still applies.
        return () if self.residual_quant == "gptq" else GPTQ_CORE_OPTIONS


class ResQMethod(Method):
    """ResQ (docs/spec/methods.md §8), see the module docstring."""

    name = "resq"
    # int4 with the top 1/8 of each input at int8 (weights per row, sym; activations per
    # token, asym), GPTQ with MSE clip.
    formats = MethodFormats(("int4",), ("int4", None), "int4", "int4", sequential_default=True)
    Options = ResQOptions
    own_act_quantizer = True

    def needs_calibration(self, qcfg) -> bool:
        return qcfg.residual_quant == "gptq"

    def prepare(self, params, cfg, calib_ids, qcfg):
        fused = fuse_norms(params, cfg)
        with jax.enable_x64(qcfg.stats_dtype == "float64"):
            moments = collect_moments(fused, cfg, calib_ids, qcfg.stats_dtype)
        u_a, u_v = resq_bases(moments, fused, cfg, jax.random.key(qcfg.seed))
        return rotate_params(fused, cfg, u_a, u_v)

    @staticmethod
    def _linear_kwargs(p, cfg, qcfg):
        weight_only = qcfg.act_fmt is None
        kw = {"act_low": None if weight_only else resq.A_LOW, "act_high": resq.A_HIGH}
        if p == "down_proj":
            return {**kw, "n_high": 0, "hadamard": True}
        if p == "o_proj":
            d, nh, nv = cfg.head_dim, cfg.num_heads, int(HIGH_FRAC * cfg.head_dim)
            per_head = {
                "act_low": None
                if weight_only
                else F.resolve_format("int4-asym", group_size=d - nv),
                "act_high": F.resolve_format("int8-asym", group_size=max(nv, 1)),
            }
            return {**per_head, "n_high": nh * nv, "perm": o_proj_perm(cfg, nv)}
        return {**kw, "n_high": int(HIGH_FRAC * cfg.hidden_size)}

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        gptq = qcfg.residual_quant == "gptq"
        st = {}
        if gptq:
            t0 = time.perf_counter()
            spec = StatsConfig(keep_absmax=False, keep_h=True, dtype=qcfg.stats_dtype)
            st = jax.block_until_ready(calib.stats(layer, {g: spec for g in groups}))
            timings["calibration_s"] += time.perf_counter() - t0
        gkw = {"percdamp": qcfg.percdamp, "block_size": qcfg.block_size}
        new, diags = {}, []
        for p in projs:
            lin = getattr(layer, p)
            kw = self._linear_kwargs(p, calib.cfg, qcfg)
            t0 = time.perf_counter()
            h = st[GROUP_OF[p]]["H"] if gptq else None
            rl = resq.resq_quantize(
                lin.w, None, h=h, mse_clip=qcfg.mse_clip, bias=lin.b, pack=True, **kw, **gkw
            )
            w_hat = F.dense_weight(rl.w_hat)
            jax.block_until_ready(w_hat)
            timings["decomposition_s"] += time.perf_counter() - t0
            w_ref = jnp.asarray(lin.w, jnp.float32)
            if rl.perm is not None:
                w_ref = w_ref[:, rl.perm]
            if rl.hadamard:
                w_ref = resq.hadamard_transform(w_ref)
            err = float(jnp.linalg.norm(w_hat - w_ref) / jnp.linalg.norm(w_ref))
            new[p] = rl
            diags.append({"layer": layer_idx, "proj": p, "w_quant_rel_err": err})
        return layer.replace(**new), diags
