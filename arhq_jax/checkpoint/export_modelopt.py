"""``arhq-jax export --to modelopt``: a compressed-tensors NVFP4 checkpoint in ModelOpt's layout.

TensorRT-LLM (and SGLang's ``modelopt`` path) read the unified Hugging Face layout that NVIDIA
ModelOpt (``modelopt.torch.export``) writes. Per quantized linear ``P`` [N, K]:

  =======================  ================  ========  =====================================
  tensor                   dtype             shape     meaning
  =======================  ================  ========  =====================================
  ``P.weight``             uint8             [N, K/2]  E2M1 codes, element 2i in the low nibble
                                                       (ModelOpt packs ``q[1::2] << 4 | q[0::2]``)
  ``P.weight_scale``       float8_e4m3fn     [N, K/16] block scales s (the stored bytes)
  ``P.weight_scale_2``     float32           []        g: ModelOpt decodes ``v · fl(s · g)``
  ``P.input_scale``        float32           []        amax/2688 (= amax/(6·448)), W4A4 only
  =======================  ================  ========  =====================================

compressed-tensors decodes ``v · fl(s / gs)`` with its ``weight_global_scale`` gs = 2688/amax, so
g is the reciprocal of gs, chosen to the last bit: among the float32 values next to fl(1/gs), the
one for which fl(s · g) equals fl(s / gs) for the most blocks of the tensors sharing gs (q/k/v,
gate/up share it, as TensorRT-LLM's fused projections need). A multiplication cannot always
reproduce a division for every s: in the blocks where no float32 g does, the two block
multipliers are 1 float32 ulp apart and the weights at most 2^-22 relative (the export prints how
many such blocks: 828 of 3,840 for the tiny test Llama); all others decode bit for bit.
``input_scale`` is fl(1 / ``input_global_scale``): compressed-tensors' activation multiplier is
2688/amax, ModelOpt's stored value its reciprocal amax/2688.

``hf_quant_config.json`` holds ``{"producer", "quantization": {"quant_algo": "NVFP4" (W4A4) or
"W4A16_NVFP4" (weight-only), "kv_cache_quant_algo": null, "group_size": 16, "exclude_modules":
[the linears left in float]}}``, and ``config.json``'s ``quantization_config`` is that config in
the form ModelOpt's ``convert_hf_quant_config_format`` gives it (``quant_method: "modelopt"``).

The LoRA branch: ModelOpt's NVFP4 layout has no low-rank term (its ``NVFP4_SVD`` algorithm is not
read by TensorRT-LLM's loaders), so the checkpoint's PEFT adapter is copied unchanged to
``OUT/lora/`` for the engine's LoRA support (TensorRT-LLM's ``lora_dir``); the base model alone
lacks the branch. Tokenizer files are copied; ``manifest.json`` marks the directory as written by
arhq-jax (an existing ``--out`` is replaced only when it is such an export).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import arhq_jax
import arhq_jax.checkpoint.lora as lora
import arhq_jax.checkpoint.out_dir as out_dir
import arhq_jax.checkpoint.store as store
import arhq_jax.checkpoint.writer as writer
from arhq_jax.checkpoint.schema import encode_linear, to_numpy
from arhq_jax.models.config import PROJECTIONS
from arhq_jax.models.params import EMBED, FINAL_NORM, linear_key, norm_key

FORMAT = "arhq-jax-export-modelopt"
VERSION = 1
HF_QUANT_CONFIG = "hf_quant_config.json"
GROUP_SIZE = 16
# How far (in float32 steps) from fl(1/gs) weight_scale_2 is searched for the value that makes
# ModelOpt's fl(s · g) equal compressed-tensors' fl(s / gs) for every block scale.
_ULP_SEARCH = 64
_OWN_FILES = {writer.CONFIG_FILE, writer.WEIGHTS_FILE, writer.INDEX_FILE, out_dir.MANIFEST}


def check_out(out) -> None:
    """Raise (FileExistsError, ValueError) unless ``out`` may become a ModelOpt export."""
    out_dir.check_replaceable(Path(out).absolute(), FORMAT)


def source_checkpoint(src) -> dict:
    """config.json of an arhq-jax checkpoint that ModelOpt's layout can express, else a one-line
    error (missing directory, not an arhq-jax checkpoint, not compressed-tensors NVFP4)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {src}")
    hf = store.read_meta(src)
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"{src}: export --to modelopt needs a compressed-tensors NVFP4 checkpoint; this one "
            f"is {store.describe(src).split(' (')[0]}"
        )
    return hf


def weight_scale_2(gs: np.float32, scales: np.ndarray) -> tuple[np.float32, int]:
    """ModelOpt's per-tensor ``weight_scale_2`` g for compressed-tensors' global scale ``gs``.

    ModelOpt decodes a block with fl(s · g), compressed-tensors with fl(s / gs): the two agree
    to 1 float32 ulp for g = fl(1/gs), and bit for bit for every s only when some float32 g
    lies in all the intervals {g : fl(s · g) = fl(s / gs)}, which is often not the case.

    Args:
      gs: float32 ``weight_global_scale`` (2688/amax).
      scales: float8_e4m3fn block scales (any shape) of every tensor that shares ``gs``.
    Returns:
      ``(g, blocks)``: among the float32 values within ``_ULP_SEARCH`` steps of fl(1/gs), the
      one (nearest first) with the fewest blocks whose fl(s · g) differs from fl(s / gs), and
      that number of blocks (0: ModelOpt's decode is compressed-tensors' bit for bit).
    """
    gs = np.float32(gs)
    s, counts = np.unique(np.asarray(scales).astype(np.float32), return_counts=True)
    want = (s / gs).astype(np.float32).view(np.uint32)
    g0 = np.float32(1) / gs
    best, best_bad = g0, None
    up, down = g0, g0
    for k in range(_ULP_SEARCH + 1):
        for g in (up, down) if k else (g0,):
            bad = int(counts[(s * g).astype(np.float32).view(np.uint32) != want].sum())
            if best_bad is None or bad < best_bad:
                best, best_bad = g, bad
            if bad == 0:
                return np.float32(g), 0
        up = np.nextafter(up, np.float32(np.inf), dtype=np.float32)
        down = np.nextafter(down, np.float32(0), dtype=np.float32)
    return np.float32(best), int(best_bad)


def hf_quant_config(w4a4: bool, exclude: list[str]) -> dict:
    """``hf_quant_config.json`` as ModelOpt's ``get_quant_config`` writes it."""
    return {
        "producer": {"name": "arhq-jax", "version": arhq_jax.__version__},
        "quantization": {
            "quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": GROUP_SIZE,
            "exclude_modules": list(exclude),
        },
    }


def quantization_config(hf_quant: dict) -> dict:
    """config.json's ``quantization_config``: ModelOpt's ``convert_hf_quant_config_format``."""
    q = hf_quant["quantization"]
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": q["group_size"]}
    group = {"weights": dict(fp4), "targets": ["Linear"]}
    if q["quant_algo"] == "NVFP4":
        group = {"input_activations": dict(fp4), **group}
    return {
        "config_groups": {"group_0": group},
        "ignore": list(q["exclude_modules"]),
        "quant_algo": q["quant_algo"],
        "producer": hf_quant["producer"],
        "quant_method": "modelopt",
    }


def _linears(cfg, params):
    for i, layer in enumerate(params.layers):
        for p in PROJECTIONS:
            yield linear_key(i, p), getattr(layer, p)
    if params.lm_head is not None:
        yield "lm_head", params.lm_head


def _modelopt_tensors(cfg, params):
    """``(name, array)`` in checkpoint order, whether the linears are W4A4, and ``(blocks whose
    ModelOpt decode is 1 ulp off compressed-tensors', all blocks)``."""
    encoded = [(prefix, encode_linear(prefix, lin)) for prefix, lin in _linears(cfg, params)]
    shared: dict[int, list] = {}  # gs bits -> the block scales of every tensor using it
    for prefix, enc in encoded:
        t = dict(enc.tensors)
        if enc.entry["kind"] == "ct-nvfp4":
            gs = t[f"{prefix}.weight_global_scale"].reshape(())
            shared.setdefault(int(gs.view(np.uint32)), []).append(t[f"{prefix}.weight_scale"])
    g_of, off_blocks, all_blocks = {}, 0, 0
    for bits, scales in shared.items():
        gs = np.array(bits, np.uint32).view(np.float32)
        flat = np.concatenate([s.reshape(-1) for s in scales])
        g_of[bits], n_bad = weight_scale_2(gs, flat)
        off_blocks += n_bad
        all_blocks += flat.size

    out = [(EMBED, to_numpy(params.embed))]
    by_layer: dict[int, list] = {}
    w4a4 = set()
    for prefix, enc in encoded:
        t = dict(enc.tensors)
        rows = []
        if enc.entry["kind"] == "ct-nvfp4":
            w4a4.add(enc.entry["w4a4"])
            gs = t[f"{prefix}.weight_global_scale"].reshape(())
            rows += [
                (f"{prefix}.weight", t[f"{prefix}.weight_packed"]),
                (f"{prefix}.weight_scale", t[f"{prefix}.weight_scale"]),
                (f"{prefix}.weight_scale_2", np.array(g_of[int(gs.view(np.uint32))], np.float32)),
            ]
            if enc.entry["w4a4"]:
                igs = t[f"{prefix}.input_global_scale"].reshape(())
                rows.append((f"{prefix}.input_scale", np.array(np.float32(1) / igs, np.float32)))
            if f"{prefix}.bias" in t:
                rows.append((f"{prefix}.bias", t[f"{prefix}.bias"]))
        elif enc.entry["kind"] == "dense":
            rows += enc.tensors
        else:  # the loader's quantization_config check makes this unreachable for ct checkpoints
            raise ValueError(f"{prefix}: kind {enc.entry['kind']!r} has no ModelOpt layout")
        layer = int(prefix.split(".")[2]) if prefix.startswith("model.layers.") else -1
        by_layer.setdefault(layer, []).extend(rows)
    for i, layer in enumerate(params.layers):
        for n in ("input_norm", "post_norm", "q_norm", "k_norm"):
            if getattr(layer, n, None) is not None:
                out.append((norm_key(i, n), to_numpy(getattr(layer, n))))
        out += by_layer.get(i, [])
    out.append((FINAL_NORM, to_numpy(params.final_norm)))
    out += by_layer.get(-1, [])
    if len(w4a4) != 1:
        raise ValueError("the checkpoint mixes W4A4 and weight-only linears; ModelOpt has one algo")
    return out, w4a4.pop(), (off_blocks, all_blocks)


def export_modelopt(src, out, *, max_shard_bytes: int = writer.DEFAULT_SHARD_BYTES) -> str:
    """Write ``out``: the checkpoint ``src`` in ModelOpt's unified HF NVFP4 layout (module doc).

    Returns a one-line summary. Raises FileNotFoundError, ``CheckpointError`` (a ValueError) or
    ValueError naming the problem, FileExistsError for an ``out`` that is not our export.
    """
    src, out = Path(src), Path(out)
    hf = source_checkpoint(src)
    check_out(out)
    params, cfg, _ = store.load(src)
    tensors, w4a4, (off, total) = _modelopt_tensors(cfg, params)
    quant = hf_quant_config(w4a4, hf["quantization_config"]["ignore"])
    config = {k: v for k, v in hf.items() if k != "arhq_jax"}
    config["quantization_config"] = quantization_config(quant)
    listed = out_dir.read_manifest(src, store.FORMAT)
    with out_dir.replacing(out, FORMAT, VERSION) as tmp:
        w = writer.CheckpointWriter(tmp, max_shard_bytes)
        try:
            for name, arr in tensors:
                w.add(name, arr)
            writer._close_shards(tmp, w.shards)
        except BaseException:
            w.abort()
            raise
        (tmp / writer.CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        (tmp / HF_QUANT_CONFIG).write_text(json.dumps(quant, indent=4) + "\n")
        for rel in sorted(listed):
            if rel in _OWN_FILES or ("/" not in rel and rel.endswith(".safetensors")):
                continue  # the weights were rewritten above; lora/ and tokenizer files copied
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, tmp / rel)
    has_lora = (src / writer.LORA_DIR / lora.ADAPTER_CONFIG).is_file()
    algo = quant["quantization"]["quant_algo"]
    branch = f", LoRA adapter {writer.LORA_DIR}/ (PEFT)" if has_lora else ""
    exact = f"{total - off}/{total} blocks decode bit-identical, the rest within 2^-22 relative"
    return f"wrote {out}: ModelOpt {algo} (TensorRT-LLM){branch}; {exact}"
