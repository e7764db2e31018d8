"""The low-rank branches as a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``), so that "NVFP4 base + LoRA" is exactly the quantized model.

PEFT computes ``base(x) + lora_B(lora_A(x)) · lora_alpha / r``; with lora_A = Aᵀ ``[r, in]``,
lora_B = B ``[out, r]`` and lora_alpha = r (per module through ``alpha_pattern`` when ranks
differ) that is ``x Wᵀ + (x A) Bᵀ``. Tensor names follow PEFT's saved form
``base_model.model.<module>.lora_{A,B}.weight``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from converters.safetensors_io import SafetensorsWriter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_SUFFIX_A = ".lora_A.weight"
_PREFIX = "base_model.model."


def adapter_config(ranks: dict[str, int]) -> dict:
    """PEFT's LoraConfig as saved, for ``{module name: rank}``."""
    short = {m.rsplit(".", 1)[-1] for m in ranks}
    uniform = len(set(ranks.values())) == 1
    r = max(ranks.values())
    # Short names ("q_proj") when every module of those names has a branch, else full names.
    targets = sorted(short) if _covers(ranks, short) else sorted(ranks)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": r,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if not uniform:
        cfg["rank_pattern"] = {f"^{m}$": k for m, k in ranks.items() if k != r}
        cfg["alpha_pattern"] = dict(cfg["rank_pattern"])
    return cfg


def _covers(ranks: dict[str, int], short: set[str]) -> bool:
    """True when the modules with a branch are all the layer projections of those names."""
    layers = {m.split(".")[2] for m in ranks if m.startswith("model.layers.")}
    if any(not m.startswith("model.layers.") for m in ranks):
        return False
    return len(ranks) == len(layers) * len(short) and all(
        m.rsplit(".", 1)[-1] in short for m in ranks
    )


class AdapterWriter:
    """Write the adapter tensor by tensor into the new directory ``d`` (one in memory at a time);
    ``close`` writes ``adapter_config.json`` from the ranks seen and returns the tensor bytes."""

    def __init__(self, d: Path):
        d.mkdir()
        self.d, self.ranks, self.nbytes = d, {}, 0
        self._w = SafetensorsWriter(d / ADAPTER_WEIGHTS)

    def add(self, name: str, x) -> None:
        x = np.asarray(x)
        if name.endswith(_SUFFIX_A):
            self.ranks[name[len(_PREFIX) : -len(_SUFFIX_A)]] = int(x.shape[0])
        self._w.add(name, x)
        self.nbytes += x.nbytes

    def close(self) -> int:
        self._w.close({"format": "pt"})
        (self.d / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config(self.ranks), indent=1, sort_keys=True) + "\n"
        )
        return self.nbytes

    def abort(self) -> None:
        self._w.abort()
