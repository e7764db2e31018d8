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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = path.stat()
    try:
        return _parsed(str(path.resolve()), st.st_mtime_ns, st.st_size)
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:
        # gguf's parser fails on a truncated or corrupt file with whatever numpy raises.
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int):
    """The ``GGUFReader`` of one version of a file: parsing the metadata of a 49k-token
    vocabulary takes seconds, and the config, the tokenizer check and the tensors share it."""
    from gguf import GGUFReader

    return GGUFReader(path)


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
    cfg, tensors = gguf_tensors(path, param_dtype=param_dtype, dtype=dtype)
    return cfg, tensors.read, tensors.names()


def gguf_tensors(path: str | Path, *, param_dtype: str = "float32", dtype: str | None = None):
    """``(cfg, GGUFTensors)`` of a GGUF file (see ``GGUFTensors``)."""
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
    return cfg, GGUFTensors(path, cfg, by_hf)


class GGUFTensors:
    """The tensors of a GGUF by HF name, dequantized to f32 (HF layout) from the reader's memory
    map when asked for, and only as much as is asked for: a row range or a row gather of a 2-D
    tensor decodes those rows' blocks only (a GGUF block never spans two rows), a strided sample
    the rows it touches, a shape none. Every piece is gguf's own numpy dequantizer applied to the
    same blocks, so it equals the same piece of the whole tensor bit for bit.

    Methods as ``converters.lazy``'s stores: ``names``, ``shape``, ``read``, ``rows``,
    ``gather``, ``strided``, ``close``.
    """

    def __init__(self, path: Path, cfg: ModelConfig, by_hf: dict):
        self.path, self.cfg, self._by_hf = path, cfg, by_hf

    def names(self) -> list[str]:
        return list(self._by_hf)

    def _tensor(self, name: str):
        t = self._by_hf.get(name)
        if t is None:
            raise ValueError(f"missing tensor {name!r}")
        return t

    def _heads(self, name: str) -> int | None:
        """The head count of a q/k weight whose rows llama.cpp permuted (else None)."""
        if self.cfg.family != "llama":
            return None
        if ".q_proj." in name:
            return self.cfg.num_heads
        return self.cfg.num_kv_heads if ".k_proj." in name else None

    def _decode(self, t, data) -> np.ndarray:
        from gguf import dequantize

        try:
            return dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {t.name}: {e}") from None

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self._by_hf.get(name)
        return None if t is None else tuple(int(n) for n in reversed(t.shape))

    def read(self, name: str) -> np.ndarray | None:
        """The whole tensor (f32), None when the file lacks it."""
        t = self._by_hf.get(name)
        if t is None:
            return None
        w = self._decode(t, t.data)
        heads = self._heads(name)
        return w if heads is None else unpermute_qk(w, heads)

    def _by_rows(self, name: str) -> bool:
        return self._tensor(name).data.ndim == 2 and self._heads(name) is None

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a tensor (f32)."""
        if not self._by_rows(name):
            return self.read(name)[start:stop]
        t = self._tensor(name)
        return self._decode(t, t.data[start:stop])

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """``tensor[ids]`` (``ids`` int ``[...]``) → ``[..., cols]`` f32; each distinct row
        decoded once."""
        ids = np.asarray(ids)
        if not self._by_rows(name):
            return self.read(name)[ids]
        t = self._tensor(name)
        uniq, inv = np.unique(ids.reshape(-1), return_inverse=True)
        rows = self._decode(t, t.data[uniq])
        return rows[inv].reshape(*ids.shape, rows.shape[-1])

    def strided(self, name: str, step: int) -> np.ndarray:
        """``tensor.reshape(-1)[::step]`` (f32)."""
        if not self._by_rows(name):
            return self.read(name).reshape(-1)[::step]
        rows, cols = self.shape(name)
        flat = np.arange(0, rows * cols, step)
        r, c = np.divmod(flat, cols)
        uniq, inv = np.unique(r, return_inverse=True)
        t = self._tensor(name)
        return self._decode(t, t.data[uniq])[inv, c]

    def close(self) -> None:
        pass


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


# ----------------------------------------------------------------------------- writing (export)

_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_BLOCK = {v: k for k, v in _BLOCK.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_GLOBAL_RE = re.compile(r"^(model\.embed_tokens|model\.norm|lm_head)\.(weight|bias)$")


def gguf_name(hf: str) -> str:
    """The GGUF (llama.cpp) tensor name of an HF tensor name: the inverse of ``hf_name``.

    Raises ValueError for a name llama.cpp's llama/qwen3 graph has no tensor for.
    """
    if m := _HF_BLOCK_RE.match(hf):
        i, part, kind = m.groups()
        if part in _HF_BLOCK:
            return f"blk.{i}.{_HF_BLOCK[part]}.{kind}"
    elif m := _HF_GLOBAL_RE.match(hf):
        part, kind = m.groups()
        return f"{_HF_GLOBAL[part]}.{kind}"
    raise ValueError(f"tensor {hf!r} has no GGUF (llama.cpp) name")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``), the inverse
    of ``unpermute_qk``: GGUF row 2i + p = HF row p·d/2 + i, per head of d rows. Works on any
    array whose rows are the weight's output rows (packed blocks, scales, LoRA B)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot permute {w.shape[0]} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(path: str | Path, prefix: str) -> list:
    """The metadata fields of the GGUF at ``path`` whose key starts with ``prefix``, as
    ``(key, value, GGUFValueType, element GGUFValueType or None)``: what ``GGUFWriter
    .add_key_value`` takes to write them again unchanged (e.g. ``"tokenizer."``)."""
    from gguf import GGUFValueType

    out = []
    for key, f in _reader(path).fields.items():
        if not key.startswith(prefix):
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        value = f.contents()
        if sub is not None and sub != GGUFValueType.STRING:
            value = np.asarray(value).tolist()
        out.append((key, value, vtype, sub))
    return out
