"""GGUF files -> (ModelConfig, Params), and their tokenizer (docs/spec/models.md §4).

Metadata keys are prefixed by ``general.architecture`` (``llama`` or ``qwen3``). Tensors are read
through the ``gguf`` package (memory-mapped) and dequantized one at a time with its numpy
dequantizer, the one transformers uses. GGUF lists dimensions fastest first, so a weight shown as
``[in, out]`` already comes back as the row-major HF array ``[out, in]``.

llama.cpp permutes the q/k rows of ``llama``-architecture models (so its pairwise RoPE reproduces
HF's rotate-half); that is undone here, per head of size d: HF row p·(d/2) + i = GGUF row 2i + p.
Qwen3 GGUFs are stored unpermuted.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

import numpy as np

from arhq_jax.models import config_from_hf
from arhq_jax.models.config import ModelConfig, Params
from converters.hf import check_config_values, params_from_getter

SUPPORTED_GGUF_ARCHS = ("llama", "qwen3")

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, or None when there is none."""
    if m := _BLOCK_RE.match(gguf_name):
        i, part, kind = m.groups()
        return f"model.layers.{i}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    if m := _GLOBAL_RE.match(gguf_name):
        part, kind = m.groups()
        return f"{_GLOBAL[part]}.{kind}" if part in _GLOBAL else None
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows ``[n·d, ...]``, HF row p·d/2+i = GGUF row 2i+p."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {w.shape[0]} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32_value(x) -> float:
    # GGUF stores f32: the shortest decimal that rounds to the same f32 (9.99999975e-6 -> 1e-5).
    return float(str(np.float32(x)))


def _reader(path: str | Path):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:
        # gguf's parser fails on a truncated or corrupt file with whatever numpy raises.
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None


def gguf_hf_config(reader, path) -> dict:
    """An HF-style config dict (4.x layout: top-level ``rope_theta``) from GGUF metadata."""
    fields = reader.fields

    def get(key, default=None, required=False):
        if key in fields:
            return fields[key].contents()
        if required:
            raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
        return default

    arch = get("general.architecture", required=True)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHS)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            f"{path}: GGUF with a rope_freqs tensor (llama3 rope scaling) is not supported; "
            "convert the HF checkpoint instead"
        )
    scaling = get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(
            f"{path}: unsupported rope scaling {scaling!r} in GGUF; supported: none "
            "(llama3 scaling only from HF checkpoints)"
        )
    hidden = int(get(f"{arch}.embedding_length", required=True))
    heads = int(get(f"{arch}.attention.head_count", required=True))
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count")
    vocab = get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{path}: GGUF has neither {arch}.vocab_size nor tokenizer tokens")
        vocab = len(tokens)
    d = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen3ForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length", required=True)),
        "num_hidden_layers": int(get(f"{arch}.block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(head_dim) if head_dim else hidden // heads,
        "rms_norm_eps": _f32_value(get(f"{arch}.attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": _f32_value(get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get(f"{arch}.context_length", required=True)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "hidden_act": "silu",
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = get(f"tokenizer.ggml.{key}")
        if v is not None:
            d[hf] = int(v)
    return d


def load_gguf(
    path: str | Path, *, param_dtype: str = "float32", dtype: str | None = None
) -> tuple[ModelConfig, Params]:
    """Load a llama/qwen3 GGUF -> ``(cfg, params)``; quantized tensors are dequantized to f32
    (exactly as transformers does) and then cast to ``param_dtype``."""
    cfg, get, names = open_gguf(path, param_dtype=param_dtype, dtype=dtype)
    return cfg, params_from_getter(cfg, get, names, Path(path))


def open_gguf(path: str | Path, *, param_dtype: str = "float32", dtype: str | None = None):
    """``(cfg, get, names)`` of a GGUF: ``get(hf_name)`` dequantizes one tensor to f32 (HF
    layout) from the reader's memory map, None for a name the file lacks; ``names`` every HF
    name it holds."""
    from gguf import dequantize

    path = Path(path)
    reader = _reader(path)
    try:
        d = gguf_hf_config(reader, path)
        cfg = check_config_values(
            config_from_hf(d, param_dtype=param_dtype, dtype=dtype or param_dtype), path
        )
    except ValueError as e:  # (UnicodeDecodeError included: a corrupt metadata string)
        raise ValueError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None

    by_hf = {}
    unknown = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
        else:
            by_hf[name] = t
    if unknown:
        raise ValueError(f"{path}: GGUF tensors with no HF counterpart: {', '.join(unknown[:5])}")

    def get(name: str) -> np.ndarray | None:
        t = by_hf.get(name)
        if t is None:
            return None
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name}: {e}") from None
        if cfg.family == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_qk(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        return w

    return cfg, get, list(by_hf)


def gguf_has_tokenizer(path: str | Path) -> bool:
    """Whether the GGUF at ``path`` carries tokenizer metadata (``tokenizer.ggml.model``)."""
    return "tokenizer.ggml.model" in _reader(path).fields


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, mtime_ns: int, tokenizer_dir: str | None):
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if tokenizer_dir is not None:
            return AutoTokenizer.from_pretrained(
                tokenizer_dir, gguf_file=str(p), trust_remote_code=False
            )
        # transformers reads a gguf_file's tokenizer from the directory it names: give it one
        # that holds only a link to the file, so that nothing else lying beside the .gguf
        # (a tokenizer_config.json, an auto_map) takes part.
        with tempfile.TemporaryDirectory(prefix="arhq-gguf-tok-") as d:
            (Path(d) / p.name).symlink_to(p)
            return AutoTokenizer.from_pretrained(d, gguf_file=p.name, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, IndexError, OSError) as e:  # transformers' parser
        raise ValueError(f"{p}: cannot build its tokenizer: {e}") from None


def load_gguf_tokenizer(path: str | Path, tokenizer_dir: str | Path | None = None):
    """The transformers tokenizer built from a GGUF's own metadata (slow: cached per file).

    ``tokenizer_dir``: a directory whose tokenizer files complete the GGUF's (transformers'
    ``from_pretrained(tokenizer_dir, gguf_file=path)``); by default nothing but the file is read.
    """
    p = Path(path).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    where = None if tokenizer_dir is None else str(Path(tokenizer_dir).resolve())
    return _tokenizer(str(p), p.stat().st_mtime_ns, where)
