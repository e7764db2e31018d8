"""Before the model loads: its shape from the config or the GGUF header, and an estimate of the
run's memory and time, so that a recipe that does not fit the model, or a run that will not fit
the machine, is known in a second rather than after the load.

The estimate's model (``estimate``), for a model of L layers whose linears hold P_l weights per
layer, calibrated on T tokens of sequence length S:

- calibration: ``passes × (2·P_l + 4·S·H) · T`` FLOPs per layer, with one pass for the statistics
  and one advancing the hidden states (one more per input group in sequential mode), none for a
  data-free recipe; at half the measured matmul rate (what the calibration forward reached on
  the 2-core CPU machine: 57 % of the jnp f32 matmul peak);
- decomposition: per input group (shared G) an eigh of ``4·K³``, per linear ``4·N·K·min(N, K)``
  (the SVD/eigh of the smaller Gram), ``K³/3 + 2·N·K²`` per linear for GPTQ, nothing for RTN; at a
  quarter of the matmul rate (LAPACK's eigh is far from the matmul peak);
- the matmul rate is measured here (a 1024² f32 jnp matmul, best of 3);
- compilation, the load and the checkpoint write are not counted;
- memory (f32 throughout): the device holds two layers, two sets of calibration hidden states
  (``T·H`` each; one batch with ``--hidden-on-host``), the Gram statistics (``2·K²`` per input
  group) and one batch's activations; the host three layers (read ahead, quantized, written)
  and the hidden states on the host when asked; a run that loads the whole model in memory
  holds it on both. On a CPU the two are the same memory.

On SmolLM2-135M (ARHQ r32, 16,384 tokens, the idle 2-core machine) the model predicts 31 s of
calibration and 7 s of decomposition; the run measured 28.6 s and 6.6 s.
"""

from __future__ import annotations

import dataclasses
import struct
import time

import jax
import jax.numpy as jnp

from arhq_jax.models import config_from_hf
from arhq_jax.models.config import INPUT_GROUPS, ModelConfig
from converters.gguf import gguf_hf_config, gguf_tensors
from converters.hf import check_config_values, read_hf_config
from converters.registry import check_tokenizer, source_kind

CALIB_EFFICIENCY = 0.5
DECOMP_EFFICIENCY = 0.25


def peek_config(source, *, require_tokenizer: bool = False) -> ModelConfig | None:
    """The model config of ``source`` (``"smollm2"``, an HF directory, a ``.gguf``) from its
    ``config.json`` or GGUF header, decoding no tensor; None for an orbax directory (its config
    comes with its arrays). A missing or malformed source, or (``require_tokenizer``) one without
    a tokenizer, is the loader's own error."""
    kind, path = source_kind(source)
    if require_tokenizer and kind != "gguf":  # (a GGUF's: from the header below)
        check_tokenizer(kind, path)
    if kind == "hf":
        d = read_hf_config(path)
        try:
            cfg = config_from_hf(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        return check_config_values(cfg, path / "config.json")
    if kind == "gguf":
        header = _gguf_header(path)
        if header is None:  # a version this reader does not know: the library's parser
            if require_tokenizer:
                check_tokenizer(kind, path)
            return gguf_tensors(path)[0]
        if require_tokenizer and "tokenizer.ggml.model" not in header.fields:
            check_tokenizer(kind, path)  # (its own message; GGUFReader confirms)
        try:
            cfg = config_from_hf(gguf_hf_config(header, path))
        except (ValueError, TypeError) as e:
            raise ValueError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None
        return check_config_values(cfg, path)
    return None


# GGUF value types: (struct format, size) of the scalars; 8 string, 9 array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}  # fmt: skip


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Tensor:
    def __init__(self, name: str):
        self.name = name


class _Header:
    """The part of ``gguf.GGUFReader`` that ``gguf_hf_config`` reads: ``fields[key].contents()``
    and ``tensors[i].name``. Arrays are skipped and stand as ``range(count)`` (only their
    length is read: the vocabulary size)."""

    def __init__(self, fields: dict, tensors: list):
        self.fields = {k: _Field(v) for k, v in fields.items()}
        self.tensors = [_Tensor(n) for n in tensors]


def _gguf_header(path) -> _Header | None:
    """The key-value metadata and tensor names of a GGUF v2/v3 file, read directly (seconds
    faster than ``GGUFReader``, which parses every token of the vocabulary); None for another
    version. A truncated or malformed header is a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(16 * 2**20)
            pos = 0

            def take(n: int) -> bytes:
                nonlocal data, pos
                while pos + n > len(data):
                    more = f.read(max(n, 16 * 2**20))
                    if not more:
                        raise ValueError("truncated header")
                    data = data[pos:] + more
                    pos = 0
                out = data[pos : pos + n]
                pos += n
                return out

            def num(fmt: str):
                return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

            def string() -> str:
                return take(num("Q")).decode("utf-8")

            def value(t: int):
                if t in _GGUF_SCALARS:
                    return num(_GGUF_SCALARS[t])
                if t == 8:
                    return string()
                if t == 9:
                    et, count = num("I"), num("Q")
                    for _ in range(count):
                        value(et)
                    return range(count)
                raise ValueError(f"unknown GGUF value type {t}")

            if take(4) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            if num("I") not in (2, 3):
                return None
            n_tensors, n_kv = num("Q"), num("Q")
            fields = {}
            for _ in range(n_kv):
                key = string()
                fields[key] = value(num("I"))
            names = []
            for _ in range(n_tensors):
                names.append(string())
                take(8 * num("I") + 4 + 8)  # dims, type, offset
            return _Header(fields, names)
    except (ValueError, struct.error, UnicodeDecodeError, MemoryError) as e:
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The run's predicted cost (see the module docstring for the model)."""

    params: int  # every parameter of the model
    linear_params: int  # in the decoder layers' linears
    calib_flops: float
    decomp_flops: float
    rate: float  # measured matmul FLOP/s
    device_bytes: int
    host_bytes: int
    platform: str

    @property
    def seconds(self) -> float:
        return self.calib_flops / (CALIB_EFFICIENCY * self.rate) + self.decomp_flops / (
            DECOMP_EFFICIENCY * self.rate
        )

    def line(self, cfg: ModelConfig, tokens: int) -> str:
        """The one line printed before the load."""
        secs = self.seconds
        when = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
        mem = (
            f"arrays ~{_bytes(self.device_bytes + self.host_bytes)}"
            if self.platform == "cpu"
            else f"arrays: device ~{_bytes(self.device_bytes)}, host ~{_bytes(self.host_bytes)}"
        )
        return (
            f"plan: {cfg.family}, {cfg.num_layers} layers, {_count(self.params)} parameters "
            f"({_count(self.linear_params)} in the layers' linears); {tokens} calibration "
            f"tokens: ~{_flop(self.calib_flops)} calibration + ~{_flop(self.decomp_flops)} "
            f"decomposition; est. {when} at {self.rate / 1e9:.0f} GFLOP/s measured on "
            f"{self.platform} (load, compilation and writing not counted); {mem}"
        )


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _flop(f: float) -> str:
    return f"{f / 1e12:.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:.2f} GFLOP"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """``(all parameters, those of the decoder layers' linears)``."""
    per_layer = sum(n * k for n, k in cfg.linear_shapes().values())
    norms = 2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0)
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embed
    total = embed + head + cfg.hidden_size + cfg.num_layers * (per_layer + norms)
    return total, cfg.num_layers * per_layer


def measure_rate(n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of one ``n × n`` f32 matmul on the default device (best of ``reps``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / max(best, 1e-9)


def estimate(
    cfg: ModelConfig,
    qcfg,
    tokens: int,
    seq_len: int,
    *,
    batch_size: int,
    hidden_on_host: bool = False,
    streamed: bool = True,
    rate: float | None = None,
    platform: str | None = None,
) -> Estimate:
    """The cost of quantizing ``cfg`` with ``qcfg`` on ``tokens`` calibration tokens."""
    if rate is None:
        rate = measure_rate()
    if platform is None:
        platform = jax.default_backend()
    shapes = cfg.linear_shapes()
    total, linear = count_params(cfg)
    per_layer = linear // max(cfg.num_layers, 1)
    projs = [p for p in qcfg.projections if p in shapes]
    method = qcfg.method_impl
    reads = qcfg.sequential or method.needs_calibration(qcfg)
    passes = 0 if not reads else 2 + (len(qcfg.groups) if qcfg.sequential else 0)
    attn = 4 * seq_len * cfg.num_heads * cfg.head_dim
    calib = cfg.num_layers * passes * (2 * per_layer + attn) * tokens
    dec = 0.0
    gptq = qcfg.method == "gptq" or getattr(qcfg, "residual_quant", None) == "gptq"
    for g in qcfg.groups:
        members = [p for p in INPUT_GROUPS[g] if p in projs]
        if not members:
            continue
        k = shapes[members[0]][1]
        if qcfg.uses_branch:
            dec += 4 * k**3
        for p in members:
            n, k = shapes[p]
            if qcfg.uses_branch:
                dec += 4 * n * k * min(n, k)
            if gptq:
                dec += k**3 / 3 + 2 * n * k * k
    dec *= cfg.num_layers
    f32 = 4
    layer_bytes = per_layer * f32
    hidden = tokens * cfg.hidden_size * f32 if reads else 0
    batch_hidden = batch_size * seq_len * cfg.hidden_size * f32
    grams = sum(2 * shapes[INPUT_GROUPS[g][0]][1] ** 2 for g in qcfg.groups) * f32 if reads else 0
    acts = batch_size * seq_len * (3 * cfg.intermediate_size + 4 * cfg.hidden_size) * f32
    device = 2 * layer_bytes + grams + acts + (2 * batch_hidden if hidden_on_host else 2 * hidden)
    host = 3 * layer_bytes + (hidden if hidden_on_host else 0)
    if not streamed:
        device += total * f32
        host += total * f32
    return Estimate(total, linear, float(calib), float(dec), rate, int(device), int(host), platform)
