"""``arhq-jax export --to gguf``: an MXFP4 or NVFP4 checkpoint as a llama.cpp GGUF (+ LoRA).

The model file (``--out FILE.gguf``), as llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama or
Qwen3 model:

- metadata: ``general.architecture`` (``llama`` / ``qwen3``), ``general.type`` ``model``,
  ``general.name``, ``general.file_type`` (38 MXFP4, 39 NVFP4), ``general.quantization_version``,
  ``<arch>.context_length``, ``.embedding_length``, ``.block_count``, ``.feed_forward_length``,
  ``.rope.dimension_count``, ``.rope.freq_base``, ``.attention.head_count``,
  ``.attention.head_count_kv``, ``.attention.layer_norm_rms_epsilon``,
  ``.attention.key_length`` / ``.value_length``, ``.vocab_size``; the ``tokenizer.*`` fields
  copied unchanged from the source GGUF (the model the checkpoint was quantized from, or
  ``tokenizer_gguf``); ``arhq_jax.export`` marks a file this exporter wrote;
- tensor names: ``converters.gguf.gguf_name`` (the inverse of the reader's mapping); the rows of
  q/k weights (and of their LoRA B) are permuted as llama.cpp's Llama converter does
  (``permute_qk``; Qwen3 is stored unpermuted);
- each MXFP4 weight [N, K] is GGML type MXFP4 (39): per block of 32 elements 17 bytes, the E8M0
  scale byte e then 16 bytes whose low nibbles hold elements 0..15 and high nibbles 16..31
  (arhq-jax packs element 2i in the low nibble of byte i: the nibbles are reordered, the codes
  and scale bytes are kept). ggml decodes ``kvalues[code] · 2^(e-128)`` with kvalues the doubled
  E2M1 values, i.e. ``value(code) · 2^(e-127)``: the OCP E8M0 bias, arhq-jax's decode exactly;
- each compressed-tensors NVFP4 weight [N, K] (K a multiple of 64) is GGML type NVFP4 (40), as
  llama.cpp's converter repacks ModelOpt checkpoints: per 64 elements 36 bytes, the four
  16-element blocks' E4M3 scale bytes (unsigned: the sign bit is 0 in a block scale) then 4 × 8
  bytes whose low nibbles hold elements 0..7 and high nibbles 8..15 of each block. ggml decodes
  ``value(code) · s`` (kvalues doubled, the scale halved); the per-tensor factor is the F32
  tensor ``<name>.scale`` (ModelOpt's ``weight_scale_2`` g, ``export_modelopt.weight_scale_2``)
  that llama.cpp multiplies into the matmul output, and ``<name>.input_scale`` is 1 /
  ``input_global_scale`` (W4A4 checkpoints). So llama.cpp computes (x · (v·s)ᵀ) · g where
  arhq-jax computes x · (v · fl(s/gs))ᵀ: the block part is bit for bit the same, the tensor
  scale agrees to 2^-22 relative;
- norms in F32, the embedding, biases and a float lm_head in the checkpoint's dtype (F32, BF16
  or F16).

The LoRA branch goes to ``FILE.lora.gguf`` as llama.cpp's ``convert_lora_to_gguf.py`` writes an
adapter: ``general.type`` ``adapter``, ``adapter.type`` ``lora``, ``adapter.lora.alpha``, tensors
``<gguf name>.lora_a`` (PEFT lora_A = Aᵀ ``[r, K]``) and ``.lora_b`` (lora_B = B ``[N, r]``).
llama.cpp scales a branch by alpha / r (r from the tensor) when alpha is not 0, else by 1; the
branch is unscaled, so alpha is r when every rank is r, else 0.

llama.cpp's CPU and GPU kernels multiply these weights with 8-bit (or float) activations: a W4A4
checkpoint is served weight-only. A checkpoint mixing MXFP4 and NVFP4, or holding other formats
or layouts (arhq-jax's own, smoothing, int), is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import arhq_jax.checkpoint.export_modelopt as export_modelopt
import arhq_jax.checkpoint.store as store
from arhq_jax.linears.base import Dense
from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.models.config import PROJECTIONS
from arhq_jax.models.params import EMBED, FINAL_NORM, linear_key, norm_key
from arhq_jax.numerics import elements
from converters.gguf import gguf_metadata, gguf_name, permute_qk
from converters.registry import source_kind

MARKER = "arhq_jax.export"
# llama_ftype: LLAMA_FTYPE_MOSTLY_MXFP4_MOE (the only MXFP4 file type), LLAMA_FTYPE_MOSTLY_NVFP4
FILE_TYPES = {"mxfp4": 38, "nvfp4": 39}
QUANTIZATION_VERSION = 2
BLOCK = 32
ADAPTER_SUFFIX = ".lora.gguf"


def adapter_path(out) -> Path:
    """``X.gguf`` → ``X.lora.gguf`` beside it."""
    out = Path(out)
    return out.with_name(out.name[: -len(".gguf")] + ADAPTER_SUFFIX)


def check_out(out) -> None:
    """Raise unless ``out`` (and its adapter beside it) may be written: a name ending in .gguf
    in an existing directory, absent or a GGUF this exporter wrote (nothing else is replaced)."""
    out = Path(out)
    if not out.name.endswith(".gguf") or out.name.endswith(ADAPTER_SUFFIX):
        raise ValueError(f"--out {out}: give a file name ending in .gguf (not {ADAPTER_SUFFIX})")
    if not out.absolute().parent.is_dir():
        raise FileNotFoundError(f"--out {out}: directory {out.absolute().parent} does not exist")
    for p in (out, adapter_path(out)):
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise FileExistsError(f"{p} exists and is not a regular file; not replacing it")
        if p.exists() and not _ours(p):
            raise FileExistsError(f"{p} exists and was not written by arhq-jax; not replacing it")


def _ours(p: Path) -> bool:
    try:
        from gguf import GGUFReader

        return MARKER in GGUFReader(str(p)).fields
    except Exception:  # not a GGUF at all (any parse error): not ours
        return False


def mxfp4_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """GGML MXFP4 bytes of an arhq-jax MXFP4 weight.

    Args:
      codes: uint8 ``[N, K/2]``, element 2i in the low nibble of byte i (K a multiple of 32).
      scales: E8M0 bytes (uint8 or float8_e8m0fnu) ``[N, K/32]``.
    Returns:
      uint8 ``[N, K/32 · 17]``: per block the scale byte, then byte j = element j | element
      j+16 << 4.
    """
    n = codes.shape[0]
    c = np.asarray(elements.unpack_nibbles(jnp.asarray(codes)), np.uint8)
    nb = c.shape[1] // BLOCK
    c = c.reshape(n, nb, BLOCK)
    qs = c[..., :16] | (c[..., 16:] << 4)
    e = np.asarray(scales).view(np.uint8).reshape(n, nb, 1)
    return np.concatenate([e, qs], axis=-1).reshape(n, nb * 17)


def nvfp4_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """GGML NVFP4 bytes of a compressed-tensors NVFP4 weight.

    Args:
      codes: uint8 ``[N, K/2]``, element 2i in the low nibble of byte i (K a multiple of 64).
      scales: float8_e4m3fn ``[N, K/16]`` block scales (non-negative).
    Returns:
      uint8 ``[N, K/64 · 36]``: per 64 elements the four scale bytes, then per 16-element block
      8 bytes, byte j = element j | element j+8 << 4.
    """
    n = codes.shape[0]
    c = np.asarray(elements.unpack_nibbles(jnp.asarray(codes)), np.uint8)
    ns = c.shape[1] // 64
    c = c.reshape(n, ns, 4, 16)
    qs = (c[..., :8] | (c[..., 8:] << 4)).reshape(n, ns, 32)
    d = (np.asarray(scales).view(np.uint8) & 0x7F).reshape(n, ns, 4)
    return np.concatenate([d, qs], axis=-1).reshape(n, ns * 36)


_FORMAT_OF = {"mxfp4": ("mxfp4", BLOCK), "nvfp4": ("nvfp4", 64)}


def _format(prefix: str, lin, src: Path) -> str:
    """ "mxfp4" or "nvfp4" for a linear GGUF can hold, else a one-line error naming it."""
    if not isinstance(lin, QuantLinear):
        raise ValueError(
            f"{src}: {prefix} is a {type(lin).__name__}; export --to gguf writes MXFP4 and "
            "NVFP4 QuantLinears and float linears only"
        )
    q = lin.w
    if q.spec.name not in _FORMAT_OF or (q.spec.name == "nvfp4" and q.spec.convention != "ct"):
        raise ValueError(
            f"{src}: {prefix} is {q.spec.label}; export --to gguf needs an MXFP4 (--format "
            "mxfp4) or compressed-tensors NVFP4 checkpoint"
        )
    if lin.smooth is not None:
        raise ValueError(f"{src}: {prefix} has a smoothing divisor, which GGUF cannot express")
    fmt, k_multiple = _FORMAT_OF[q.spec.name]
    if len(q.shape) != 2 or q.axis != 1 or q.shape[1] % k_multiple:
        raise ValueError(
            f"{src}: {prefix}: {fmt} weight {q.shape} (axis {q.axis}): GGUF's {fmt.upper()} "
            f"needs K a multiple of {k_multiple}"
        )
    return fmt


def _float(arr) -> tuple[np.ndarray, object]:
    """A float array as GGUF stores it: ``(array, raw_dtype)`` (BF16 as its uint16 bits)."""
    from gguf import GGMLQuantizationType

    a = np.asarray(arr)
    if a.dtype.name == "bfloat16":
        return np.ascontiguousarray(a).view(np.uint16), GGMLQuantizationType.BF16
    if a.dtype in (np.float32, np.float16):
        return np.ascontiguousarray(a), None
    raise ValueError(f"a {a.dtype} tensor has no GGUF float type")


def _tokenizer_source(hf: dict, src: Path, tokenizer_gguf) -> Path:
    if tokenizer_gguf is not None:
        p = Path(tokenizer_gguf)
        if not p.is_file():
            raise FileNotFoundError(f"--tokenizer {p}: GGUF file not found")
        return p
    model = hf["arhq_jax"]["source"].get("model")
    try:
        kind, path = source_kind(model) if isinstance(model, str) else ("?", None)
    except (OSError, ValueError):
        kind = "?"
    if kind != "gguf":
        raise ValueError(
            f"{src}: the checkpoint's source {model!r} is not a GGUF file here, so there is no "
            "tokenizer metadata to copy; pass --tokenizer FILE.gguf (a GGUF of the same "
            "vocabulary)"
        )
    return path


def _model_fields(cfg, name: str, fmt: str) -> list:
    from gguf import GGUFValueType as T

    arch = "llama" if cfg.family == "llama" else "qwen3"
    f = [
        ("general.architecture", arch, T.STRING),
        ("general.type", "model", T.STRING),
        ("general.name", name, T.STRING),
        ("general.file_type", FILE_TYPES[fmt], T.UINT32),
        ("general.quantization_version", QUANTIZATION_VERSION, T.UINT32),
        (f"{arch}.vocab_size", cfg.vocab_size, T.UINT32),
        (f"{arch}.context_length", cfg.max_position_embeddings, T.UINT32),
        (f"{arch}.embedding_length", cfg.hidden_size, T.UINT32),
        (f"{arch}.block_count", cfg.num_layers, T.UINT32),
        (f"{arch}.feed_forward_length", cfg.intermediate_size, T.UINT32),
        (f"{arch}.rope.dimension_count", cfg.head_dim, T.UINT32),
        (f"{arch}.rope.freq_base", float(cfg.rope_theta), T.FLOAT32),
        (f"{arch}.attention.head_count", cfg.num_heads, T.UINT32),
        (f"{arch}.attention.head_count_kv", cfg.num_kv_heads, T.UINT32),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), T.FLOAT32),
        (f"{arch}.attention.key_length", cfg.head_dim, T.UINT32),
        (f"{arch}.attention.value_length", cfg.head_dim, T.UINT32),
        (MARKER, "gguf model", T.STRING),
    ]
    return [(k, v, t, None) for k, v, t in f]


def _nvfp4_scales(params, src: Path) -> dict:
    """``{gs bits: g}``: ModelOpt's ``weight_scale_2`` for every NVFP4 global scale, over the
    block scales of every weight sharing it (q/k/v, gate/up)."""
    shared: dict[int, list] = {}
    for layer in params.layers:
        for p in PROJECTIONS:
            lin = getattr(layer, p)
            if isinstance(lin, QuantLinear) and lin.w.spec.name == "nvfp4":
                gs = np.asarray(lin.w.tensor_scale, np.float32).reshape(())
                shared.setdefault(int(gs.view(np.uint32)), []).append(np.asarray(lin.w.scales))
    if isinstance(params.lm_head, QuantLinear) and params.lm_head.w.spec.name == "nvfp4":
        gs = np.asarray(params.lm_head.w.tensor_scale, np.float32).reshape(())
        shared.setdefault(int(gs.view(np.uint32)), []).append(np.asarray(params.lm_head.w.scales))
    out = {}
    for bits, scales in shared.items():
        gs = np.array(bits, np.uint32).view(np.float32)
        flat = np.concatenate([x.reshape(-1) for x in scales])
        out[bits] = export_modelopt.weight_scale_2(gs, flat)[0]
    return out


def gguf_tensors(cfg, params, src: Path):
    """``(model, lora, fmt)``: lists of ``(gguf name, array, raw_dtype)`` in checkpoint order,
    and the quantized format ("mxfp4" or "nvfp4")."""
    from gguf import GGMLQuantizationType

    if cfg.family not in ("llama", "qwen3"):
        raise ValueError(f"{src}: model family {cfg.family!r} has no llama.cpp export here")
    if cfg.rope_scaling is not None:
        raise ValueError(f"{src}: rope scaling is not exported to GGUF (llama3 rope_freqs)")
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}

    def perm(prefix: str, x: np.ndarray) -> np.ndarray:
        p = prefix.rsplit(".", 1)[-1]
        return permute_qk(x, heads[p]) if cfg.family == "llama" and p in heads else x

    model, lora, fmts = [], [], set()
    g_of = _nvfp4_scales(params, src)

    def linear(prefix: str, lin) -> None:
        name = gguf_name(f"{prefix}.weight")
        if isinstance(lin, Dense):
            model.append((name, *_float(perm(prefix, np.asarray(lin.w)))))
            if lin.b is not None:
                model.append((gguf_name(f"{prefix}.bias"), *_float(perm(prefix, lin.b))))
            return
        fmt = _format(prefix, lin, src)
        fmts.add(fmt)
        codes, scales = np.asarray(lin.w.codes), np.asarray(lin.w.scales)
        if fmt == "mxfp4":
            blocks = mxfp4_blocks(codes, scales)
            model.append((name, perm(prefix, blocks), GGMLQuantizationType.MXFP4))
        else:
            blocks = nvfp4_blocks(codes, scales)
            model.append((name, perm(prefix, blocks), GGMLQuantizationType.NVFP4))
            gs = np.asarray(lin.w.tensor_scale, np.float32).reshape(())
            g = g_of[int(gs.view(np.uint32))]
            base = name[: -len(".weight")]
            model.append((f"{base}.scale", np.array([g], np.float32), None))
            if lin.act_scale is not None:
                igs = np.float32(np.asarray(lin.act_scale, np.float32).reshape(()))
                model.append((f"{base}.input_scale", np.array([1 / igs], np.float32), None))
        if lin.bias is not None:
            model.append((gguf_name(f"{prefix}.bias"), *_float(perm(prefix, lin.bias))))
        if lin.a is not None:
            a = np.ascontiguousarray(np.asarray(lin.a).T)  # PEFT lora_A [r, K]
            b = perm(prefix, np.asarray(lin.b))  # lora_B [N, r]
            lora.append((f"{name}.lora_a", *_float(a)))
            lora.append((f"{name}.lora_b", *_float(np.ascontiguousarray(b))))

    model.append((gguf_name(EMBED), *_float(params.embed)))
    for i, layer in enumerate(params.layers):
        for n in ("input_norm", "post_norm", "q_norm", "k_norm"):
            if getattr(layer, n, None) is not None:
                norm = np.asarray(getattr(layer, n)).astype(np.float32)
                model.append((gguf_name(norm_key(i, n)), norm, None))
        for p in PROJECTIONS:
            linear(linear_key(i, p), getattr(layer, p))
    model.append((gguf_name(FINAL_NORM), np.asarray(params.final_norm).astype(np.float32), None))
    if params.lm_head is not None:
        linear("lm_head", params.lm_head)
    if len(fmts) != 1:
        what = "both MXFP4 and NVFP4" if fmts else "no quantized linear"
        raise ValueError(f"{src}: the checkpoint has {what}; a GGUF export needs one of them")
    return model, lora, fmts.pop()


def _write(path: Path, arch: str, fields: list, tensors: list) -> None:
    """Write one GGUF file atomically (a temporary sibling renamed into place)."""
    from gguf import GGUFWriter

    tmp = path.with_name(f".{path.name}.arhq-tmp-{os.getpid()}")
    try:
        w = GGUFWriter(str(tmp), arch)
        for key, value, vtype, sub in fields:
            if key != "general.architecture":  # GGUFWriter writes it from ``arch``
                w.add_key_value(key, value, vtype, sub)
        for name, arr, raw in tensors:
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_gguf(src, out, *, tokenizer_gguf=None) -> str:
    """Write ``out`` (and ``adapter_path(out)`` when the checkpoint has a LoRA branch) from the
    MXFP4 or NVFP4 checkpoint ``src`` (module doc). Returns a one-line summary.

    Raises FileNotFoundError, ``CheckpointError``/ValueError naming the problem (not an arhq-jax
    checkpoint, another format, no tokenizer source), FileExistsError for an ``out`` we did not
    write.
    """
    from gguf import GGUFValueType as T

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {src}")
    check_out(out)
    hf = store.read_meta(src)
    tok = _tokenizer_source(hf, src, tokenizer_gguf)
    params, cfg, _ = store.load(src)
    model, lora, fmt = gguf_tensors(cfg, params, src)
    tok_fields = gguf_metadata(tok, "tokenizer.")
    tokens = [f for f in tok_fields if f[0] == "tokenizer.ggml.tokens"]
    if not tokens:
        raise ValueError(f"{tok}: no tokenizer.ggml.tokens in its metadata")
    if len(tokens[0][1]) != cfg.vocab_size:
        raise ValueError(
            f"{tok}: its tokenizer has {len(tokens[0][1])} tokens, the checkpoint's vocabulary "
            f"{cfg.vocab_size}; pass --tokenizer with the source model's GGUF"
        )
    arch = "llama" if cfg.family == "llama" else "qwen3"
    _write(out, arch, _model_fields(cfg, src.name, fmt) + tok_fields, model)
    line = f"wrote {out}: GGUF {fmt.upper()} ({arch}, {len(model)} tensors)"
    if lora:
        ranks = {int(a.shape[0]) for n, a, _ in lora if n.endswith(".lora_a")}
        alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0
        fields = [
            ("general.architecture", arch, T.STRING, None),
            ("general.type", "adapter", T.STRING, None),
            ("general.name", f"{src.name} LoRA", T.STRING, None),
            ("adapter.type", "lora", T.STRING, None),
            ("adapter.lora.alpha", alpha, T.FLOAT32, None),
            (MARKER, "gguf lora adapter", T.STRING, None),
        ]
        _write(adapter_path(out), arch, fields, lora)
        line += f" + LoRA adapter {adapter_path(out)} ({len(lora) // 2} pairs, alpha {alpha:g})"
    elif adapter_path(out).is_file():  # ours (check_out): an earlier export's adapter, now stale
        adapter_path(out).unlink()
    return line
