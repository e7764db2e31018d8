"""A compact torch ARHQ W4A4 (nvfp4-paper): the yardstick of benchmarks/pipeline.py.

The straightforward way: forward hooks on every ``nn.Linear`` of the decoder accumulate
``G = EᵀE`` in f32 with ``E = x − Q_a(x)`` (Q_a = the nvfp4-paper activation fake-quantizer,
spec/formats.md §4); then per linear the reference's steps (methods.md §2.2): eigh + clamp, both
roots, thin SVD of W G½, B = U_r Σ_r, A = G⁻½ V_r, and the residual fake-quantized (1-D blocks).
Linears that read the same input tensor (q/k/v; gate/up) share one G and its eigh, as arhq-jax's
input groups do (the same work, no more: a G per linear computed q/k/v's Gram and
eigendecomposition three times). Torch threads = the machine's cores.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

CODEBOOK = torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6])
MIDPOINTS = (CODEBOOK[1:] + CODEBOOK[:-1]) / 2


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """nvfp4-paper along the last axis (a multiple of 16): 4-bit block scales, ties-down."""
    xb = x.reshape(*x.shape[:-1], -1, 16)
    y = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 6
    step = torch.ldexp(torch.ones_like(y), torch.frexp(y).exponent - 4)  # 2^(E-3)
    s = (torch.round(y / step) * step).clamp_min(1e-12)
    q = CODEBOOK[torch.bucketize((xb / s).clamp(-6, 6), MIDPOINTS)]  # up only if > midpoint
    return (q * s).reshape(x.shape)


def torch_model(cfg, params):
    """The transformers Llama of arhq-jax's ``(cfg, params)``, f32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from arhq_jax.models import config_to_hf
    from arhq_jax.models.params import params_to_tensors

    model = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg))).float().eval()
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_tensors(cfg, params)}
    model.load_state_dict(sd, strict=False)
    return model


@torch.no_grad()
def quantize(model, ids: np.ndarray, rank: int = 32, batch_size: int = 8, eps: float = 1e-6):
    """ARHQ on every decoder linear of ``model`` over ``ids [S, L]`` → ({name: (B, A, Q(W_res))},
    {"calibration_s", "decomposition_s"})."""
    torch.set_num_threads(os.cpu_count())
    mods = model.model.layers.named_modules()
    linears = {n: m for n, m in mods if isinstance(m, torch.nn.Linear)}
    gram, leader, last = {}, {}, {"x": None, "name": None}

    def hook(name):
        def fn(_mod, inp):
            if inp[0] is last["x"]:  # q/k/v, gate/up: the input (and G) of the one before
                leader[name] = leader[last["name"]]
                return
            last["x"], last["name"], leader[name] = inp[0], name, name
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            e = x - fake_quant(x)
            if name not in gram:
                gram[name] = torch.zeros(x.shape[1], x.shape[1])
            gram[name].addmm_(e.T, e)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    t0 = time.perf_counter()
    ids = torch.from_numpy(np.asarray(ids, np.int64))
    for start in range(0, len(ids), batch_size):
        model.model(input_ids=ids[start : start + batch_size])  # the head is not needed
        last["x"] = None  # a tensor's identity holds within one forward only
    t1 = time.perf_counter()
    for h in handles:
        h.remove()
    roots = {}  # leader → (G½, G⁻½): one eigh per input group
    out = {}
    for name, lin in linears.items():
        lead = leader[name]
        if lead not in roots:
            g = gram[lead] / ids.numel()
            lam, u = torch.linalg.eigh(0.5 * (g + g.T))
            root = lam.clamp_min(eps).sqrt()
            roots[lead] = ((u * root) @ u.T, (u / root) @ u.T)
        g_half, g_inv_half = roots[lead]
        w = lin.weight.float()
        um, s, vt = torch.linalg.svd(w @ g_half, full_matrices=False)
        b, a = um[:, :rank] * s[:rank], g_inv_half @ vt[:rank].T
        out[name] = (b, a, fake_quant(w - b @ a.T))
    t2 = time.perf_counter()
    return out, {"calibration_s": t1 - t0, "decomposition_s": t2 - t1}
