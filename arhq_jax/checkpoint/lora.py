"""The low-rank branches as a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``), so that "NVFP4 base + LoRA" is exactly the quantized model.

PEFT computes ``base(x) + lora_B(lora_A(x)) · lora_alpha / r``; with lora_A = Aᵀ ``[r, in]``,
lora_B = B ``[out, r]`` and lora_alpha = r (per module through ``alpha_pattern`` when ranks
differ) that is ``x Wᵀ + (x A) Bᵀ``. Tensor names follow PEFT's saved form
``base_model.model.<module>.lora_{A,B}.weight``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from arhq_jax.checkpoint.out_dir import CheckpointError
from converters.safetensors_io import SafetensorsWriter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_SUFFIX_A = ".lora_A.weight"
_PREFIX = "base_model.model."
# rank_pattern / alpha_pattern keys read from a file: literal module names, optionally anchored
# (what ``adapter_config`` writes); PEFT matches them as regexes, so anything with regex syntax
# beyond "." is refused rather than interpreted.
_PATTERN_KEY = re.compile(r"\^?[A-Za-z0-9_.]{1,400}\$?")


def adapter_config(ranks: dict[str, int], base_model: str | None = None) -> dict:
    """PEFT's LoraConfig as saved, for ``{module name: rank}``; ``base_model`` (the source
    model's name or path, as the user gave it) is recorded as ``base_model_name_or_path``."""
    short = {m.rsplit(".", 1)[-1] for m in ranks}
    uniform = len(set(ranks.values())) == 1
    r = max(ranks.values())
    # Short names ("q_proj") when every module of those names has a branch, else full names.
    targets = sorted(short) if _covers(ranks, short) else sorted(ranks)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
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

    def close(self, base_model: str | None = None) -> int:
        self._w.close({"format": "pt"})
        (self.d / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config(self.ranks, base_model), indent=1, sort_keys=True) + "\n"
        )
        return self.nbytes

    def abort(self) -> None:
        self._w.abort()


# ----------------------------------------------------------------------------- reading


def adapter_ranks(reader) -> dict[str, int]:
    """``{module: rank}`` of the adapter tensors a ``SafetensorsReader`` holds (lora_A rows)."""
    out = {}
    for name in reader.names():
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX_A):
            info = reader.info(name)
            out[name[len(_PREFIX) : -len(_SUFFIX_A)]] = int(info.shape[0]) if info.shape else 0
    return out


def _pattern_value(patterns: dict, module: str, default, where: str):
    r"""PEFT's ``get_pattern_key`` lookup: the first key k with ``re.match(rf"(.*\.)?({k})$",
    module)``, else ``default``."""
    for k, v in patterns.items():
        if not _PATTERN_KEY.fullmatch(k):
            raise CheckpointError(f"{where}: pattern key {k!r} is not a plain module name")
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _number(v, where: str, what: str) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok:
        raise CheckpointError(f"{where}: {what} must be a finite number, got {v!r}")
    return v


def check_adapter_config(doc, ranks: dict[str, int], where: str) -> None:
    """``lora/adapter_config.json`` read as PEFT reads it must give, for the adapter tensors of
    ``ranks`` (``{module: rank}``), exactly the branch arhq-jax computes, ``x A Bᵀ`` with scaling
    1; else a one-line CheckpointError naming the field.

    Checked: ``peft_type`` LORA; ``use_dora`` false (DoRA rescales the weight); ``bias`` none,
    ``fan_in_fan_out`` false, no ``modules_to_save``, ``layers_to_transform`` or
    ``layer_replication``; ``target_modules`` a list whose names select exactly the modules that
    have tensors (PEFT's rule: a name equals the module or ends it after a "."); per module, the
    rank ``rank_pattern`` or ``r`` gives equals the tensors' rank, and PEFT's scaling
    ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), alphas from ``alpha_pattern``, is 1.
    """
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {doc.get('peft_type')!r}, expected 'LORA'")
    for key, allowed in (
        ("use_dora", (False,)),
        ("use_rslora", (False, True)),
        ("fan_in_fan_out", (False,)),
        ("bias", ("none",)),
        ("modules_to_save", (None, [])),
        ("layers_to_transform", (None, [])),
        ("layer_replication", (None, [])),
    ):
        v = doc.get(key, allowed[0])
        if not any(v is a or (type(v) is type(a) and v == a) for a in allowed):
            raise CheckpointError(
                f"{where}: {key} is {v!r}; arhq-jax's adapter needs {allowed[0]!r}"
            )
    r = doc.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{where}: r must be a positive int, got {r!r}")
    alpha = _number(doc.get("lora_alpha"), where, "lora_alpha")
    rank_pattern, alpha_pattern = doc.get("rank_pattern") or {}, doc.get("alpha_pattern") or {}
    for key, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pat, dict):
            raise CheckpointError(f"{where}: {key} must be a JSON object")
    targets = doc.get("target_modules")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise CheckpointError(
            f"{where}: target_modules must be a list of module names, got {str(targets)[:80]}"
        )

    def selected(module: str) -> bool:
        return any(module == t or module.endswith("." + t) for t in targets)

    for m in sorted(ranks):
        if not selected(m):
            raise CheckpointError(
                f"{where}: target_modules do not select {m!r}, which has adapter tensors "
                "(PEFT would ignore them)"
            )
    for t in targets:
        if not any(m == t or m.endswith("." + t) for m in ranks):
            raise CheckpointError(f"{where}: target module {t!r} has no adapter tensors")
    rslora = doc.get("use_rslora", False)
    for m, rank in sorted(ranks.items()):
        r_m = _pattern_value(rank_pattern, m, r, where)
        if r_m != rank:
            raise CheckpointError(f"{where}: r for {m} is {r_m!r}, its tensors have rank {rank}")
        a_m = _number(_pattern_value(alpha_pattern, m, alpha, where), where, f"alpha of {m}")
        scaling = a_m / math.sqrt(rank) if rslora else a_m / rank
        if scaling != 1.0:
            how = f"lora_alpha/{'sqrt(r)' if rslora else 'r'} = {a_m}/{rank}"
            raise CheckpointError(
                f"{where}: PEFT scales the branch of {m} by {how} = {scaling:.4g}; arhq-jax's "
                "branch is unscaled: only scaling 1 is read"
            )
