"""Reference helpers for the converter and SmolLM2 tests: transformers' GGUF loader, and our
Params read field by field.

``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` requires the ``accelerate`` package,
which is not a dependency. Without it the same transformers code path is run by hand: the config
from ``AutoConfig.from_pretrained(dir, gguf_file=...)`` and the tensors from
``load_gguf_checkpoint(..., return_tensors=True)`` (gguf's dequantizer plus transformers' tensor
processors, e.g. the llama q/k un-permutation), loaded into an f32 eager model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def transformers_gguf_model(path: str | Path):
    """An f32, eager-attention transformers model of a GGUF file, in eval mode."""
    path = Path(path)
    kw = dict(gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(path.parent, **kw).eval()
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with no_init_weights():  # every weight is loaded below (a missing one is an error)
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.float32, attn_implementation="eager"
        )
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    sd = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = getattr(cfg, "tie_word_embeddings", False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise RuntimeError(f"GGUF reference load: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def param_tensors(params) -> dict[str, np.ndarray]:
    """The HF-named tensors of our Params, read field by field (not through params_to_tensors)."""
    out = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    norms = {
        "input_norm": "input_layernorm",
        "post_norm": "post_attention_layernorm",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
    }
    for i, layer in enumerate(params.layers):
        for f, hf in norms.items():
            if getattr(layer, f) is not None:
                out[f"model.layers.{i}.{hf}.weight"] = getattr(layer, f)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            mod = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out[f"model.layers.{i}.{mod}.{p}.weight"] = getattr(layer, p).w
    if params.lm_head is not None:
        out["lm_head.weight"] = params.lm_head.w
    return {k: np.asarray(v) for k, v in out.items()}
