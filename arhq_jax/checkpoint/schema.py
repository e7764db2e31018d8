"""The data-only schema of a checkpoint's linears: a closed set of kinds, checked field by field.

Every linear is stored under its Hugging Face prefix P (``model.layers.3.mlp.down_proj``,
``lm_head``) in one of three kinds (docs/checkpoint.md has the full table):

- ``dense``: a float linear, ``P.weight`` (+ ``P.bias``), as transformers stores it.
- ``ct-nvfp4``: a ``QuantLinear`` that compressed-tensors' ``nvfp4-pack-quantized`` expresses
  (hardware NVFP4 weights, no smoothing, activations unquantized or NVFP4 with a static scale):
  ``P.weight_packed``, ``P.weight_scale``, ``P.weight_global_scale`` (+ ``P.input_global_scale``,
  ``P.bias``). Its low-rank branch is the PEFT LoRA adapter in ``lora/``.
- ``arhq``: anything else (other formats, smoothing divisors, SERQ, ResQ, FPRAG's split
  lm_head): a dataclass of arhq-jax's own whose static fields are JSON in the module's entry and
  whose arrays are tensors named ``P.<field>`` (a ``QTensor`` field f: ``P.f.codes``,
  ``P.f.scales``, ``P.f.tensor_scale``, ``P.f.zeros``; a tuple: ``P.f.0``, ``P.f.1`` …).
  A ``QuantLinear``'s factors are in ``lora/`` here too.

Reading is data only. A kind is a key of the closed table ``_CLASSES``; each class's fields are
checked against its fixed field table (names, categories, JSON types, the dtype and shape of every
tensor against the entry and the model's geometry); tensor names are derived from P and the field
names, never read from a file; no string from a file is resolved to a module, class or function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import arhq_jax.checkpoint.nvfp4_pack as ct_nvfp4
from arhq_jax.checkpoint.out_dir import CheckpointError
from arhq_jax.linears.base import Dense
from arhq_jax.linears.quantized import QuantLinear
from arhq_jax.methods.layer_methods import OutSplitLinear
from arhq_jax.methods.resq import ResQLinear
from arhq_jax.methods.serq import SERQLinear
from arhq_jax.numerics import formats

# Field categories: how a field is stored and what a file may say about it.
ARRAY, OPT_ARRAY, QTENSOR, WEIGHT, OPT_FORMAT, OPT_ACT, INT, BOOL, PARTS, LORA = (
    "array",
    "opt_array",
    "qtensor",
    "weight",  # an f32 array, a QTensor, or a tuple of QTensors (mixed precision)
    "opt_format",
    "opt_act",  # SERQ's activation quantizer name
    "int",
    "bool",
    "parts",  # a tuple of linears
    "lora",  # a QuantLinear factor, stored in the LoRA adapter
)
_CLASSES: dict[str, tuple[type, dict[str, str]]] = {
    "dense": (Dense, {"w": ARRAY, "b": OPT_ARRAY}),  # inside an out_split; top level: P.weight
    "quant": (
        QuantLinear,
        {
            "w": QTENSOR,
            "a": LORA,
            "b": LORA,
            "smooth": OPT_ARRAY,
            "bias": OPT_ARRAY,
            "act_scale": OPT_ARRAY,
            "act_fmt": OPT_FORMAT,
        },
    ),
    "serq": (
        SERQLinear,
        {
            "s": ARRAY,
            "perm": ARRAY,
            "w_main": WEIGHT,
            "c": WEIGHT,
            "b": OPT_ARRAY,
            "act_scale": OPT_ARRAY,
            "act": OPT_ACT,
        },
    ),
    "resq": (
        ResQLinear,
        {
            "w_hat": WEIGHT,
            "rot": OPT_ARRAY,
            "b": OPT_ARRAY,
            "perm": OPT_ARRAY,
            "n_high": INT,
            "hadamard": BOOL,
            "act_low": OPT_FORMAT,
            "act_high": OPT_FORMAT,
        },
    ),
    "out_split": (OutSplitLinear, {"parts": PARTS}),
}
_KIND_OF = {cls: kind for kind, (cls, _) in _CLASSES.items()}
# QuantLinear fields that are run-time choices, never stored (the loader's defaults apply).
_RUNTIME_FIELDS = {"kernel", "interpret"}
_SERQ_ACTS = ("int4", "int8", "mxfp4", "nvfp4")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_ARRAY_DTYPES = (*_FLOAT_DTYPES, "int32", "uint8", "int8", "float8_e4m3fn", "float8_e8m0fnu")
_QT_PARTS = ("codes", "scales", "tensor_scale", "zeros")
_QT_KEYS = {"shape", "axis", "dtype", "format", "zeros"}
_REQUIRED = (ARRAY, QTENSOR, WEIGHT, INT, BOOL, PARTS)
# Bounds on a file's numbers, so that a loaded model computes finite results. Real weights,
# norms, embeddings, biases, LoRA factors and SmoothQuant factors are far below 1e3 in size;
# 1e6 still leaves f32 headroom for the squares of RMSNorm and the matmul sums. Block scales are
# at most 448 (e4m3) or 2^127 (e8m0 exponents); tensor (global) scales are positive, and both
# s and 1/s must be far from f32's limits (1e-45 is a denormal: 1/s overflows).
WEIGHT_LIMIT = 1e6
SCALE_LIMIT = 1e30
TENSOR_SCALE_RANGE = (1e-30, 1e30)


def lora_names(prefix: str) -> tuple[str, str]:
    """PEFT's saved names of a module's LoRA factors (lora_A = Aᵀ ``[r, in]``, lora_B = B)."""
    base = f"base_model.model.{prefix}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


# ----------------------------------------------------------------------------- encode


@dataclasses.dataclass
class Encoded:
    """One linear, ready to write: its JSON entry and its tensors (model file and adapter)."""

    entry: dict
    tensors: list[tuple[str, np.ndarray]]
    lora: list[tuple[str, np.ndarray]]


def to_numpy(x) -> np.ndarray:
    """A host numpy copy (or view) of a device or host array."""
    return np.asarray(jax.device_get(x))


def cast_param(x, dtype: str | None, name: str) -> np.ndarray:
    """A float parameter tensor (embedding, norm, dense weight, bias) in the checkpoint's storage
    ``dtype`` (round to nearest even; None keeps its dtype). Raises ValueError when a finite value
    does not fit the dtype (e.g. beyond float16's 65504), naming the tensor."""
    x = to_numpy(x)
    if dtype is None or x.dtype.name == dtype or not _is_float(x.dtype):
        return x
    with np.errstate(over="ignore"):  # an overflow is the named error below
        y = x.astype(jnp.dtype(dtype))
    overflow = np.isfinite(x.astype(np.float32)) & ~np.isfinite(y.astype(np.float32))
    if overflow.any():
        raise ValueError(
            f"{name}: {int(overflow.sum())} values overflow {dtype} (store it in a wider dtype: "
            "--dtype float32)"
        )
    return y


def _is_float(dt) -> bool:
    return np.dtype(dt).name in _FLOAT_DTYPES


def cast_encoded(prefix: str, entry: dict, tensors, dtype: str | None):
    """An encoded linear's parameter tensors in the storage ``dtype``: a ``dense`` linear's
    weight and bias (and its entry's dtype), the bias of a ``ct-nvfp4`` linear and of a
    ``QuantLinear`` in arhq-jax's own layout (also inside FPRAG's split lm_head). Codes, scales,
    global scales and the own layout's other arrays (smoothing, rotation, SERQ's vectors) are
    left as they are. → ``(entry, tensors)``, the inputs unchanged when ``dtype`` is None."""
    if dtype is None:
        return entry, tensors
    entry = dict(entry)
    names: set[str] = set()
    if entry.get("kind") == "dense":
        entry["dtype"] = dtype
        names = {f"{prefix}.weight", f"{prefix}.bias"}
    elif entry.get("kind") == "ct-nvfp4":
        names = {f"{prefix}.bias"}
    else:
        entry = _cast_own_biases(prefix, entry, dtype, names)
    out = [(n, cast_param(x, dtype, n) if n in names else x) for n, x in tensors]
    return entry, out


def _cast_own_biases(prefix: str, entry: dict, dtype: str, names: set) -> dict:
    """An ``arhq``-kind entry with its QuantLinears' ``bias`` entries set to ``dtype``; the
    tensor names to cast are added to ``names``."""
    kind, fields = entry.get("kind"), entry.get("fields")
    if not isinstance(fields, dict):
        return entry
    if kind == "quant" and fields.get("bias") is not None:
        names.add(f"{prefix}.bias")
        fields = {**fields, "bias": {"array": {**fields["bias"]["array"], "dtype": dtype}}}
    elif kind == "out_split":
        parts = [
            _cast_own_biases(f"{prefix}.parts.{i}", e, dtype, names)
            for i, e in enumerate(fields["parts"])
        ]
        fields = {**fields, "parts": parts}
    return {**entry, "fields": fields}


def _array_entry(x: np.ndarray) -> dict:
    return {"array": {"dtype": x.dtype.name, "shape": list(x.shape)}}


# The entry's "int_variant" (format_version 2, unchanged) records in one key what the library
# now keeps apart: the sign-magnitude code layout ("serq"), a format property, and the int scale
# rule that fitted a QTensor ("gptq", "fprag"), a method's choice (``QTensor.int_rule``).
_SIGN_MAGNITUDE_VARIANT = "serq"
_INT_VARIANTS = ("default", _SIGN_MAGNITUDE_VARIANT, *formats.INT_RULES[1:])


def format_entry(spec: formats.FormatSpec, int_rule: str = "default") -> dict:
    """A format (and the int rule of a QTensor in it) as the entry's JSON dict."""
    d = dataclasses.asdict(spec)
    if d.get("tile") is not None:
        d["tile"] = list(d["tile"])
    if d.pop("sign_magnitude"):
        if int_rule != "default":
            raise ValueError(f"a sign-magnitude format with int_rule {int_rule!r} has no entry")
        int_rule = _SIGN_MAGNITUDE_VARIANT
    d["int_variant"] = int_rule
    return d


def encode_linear(prefix: str, lin) -> Encoded:
    """A linear → ``Encoded``: ``ct-nvfp4`` when compressed-tensors expresses it, else its own
    kind. Raises ValueError for a linear type the schema does not know."""
    if isinstance(lin, Dense):
        tensors = [(f"{prefix}.weight", to_numpy(lin.w))]
        if lin.b is not None:
            tensors.append((f"{prefix}.bias", to_numpy(lin.b)))
        return Encoded({"kind": "dense", "dtype": tensors[0][1].dtype.name}, tensors, [])
    if isinstance(lin, QuantLinear):
        try:
            return _encode_ct(prefix, lin)
        except ValueError:
            pass  # not expressible in compressed-tensors: arhq-jax's own layout below
    out = Encoded({}, [], [])
    out.entry = _encode_obj(prefix, lin, out)
    add_lora_entry(out.entry, prefix, lin, out)
    return out


def _encode_ct(prefix: str, lin: QuantLinear) -> Encoded:
    if lin.smooth is not None:
        raise ValueError("a smoothing divisor is not expressible in compressed-tensors")
    act = None if lin.act_fmt is None else formats.resolve_format(lin.act_fmt)
    if act is not None and (act != lin.w.spec or lin.act_scale is None):
        raise ValueError("activations must be nvfp4 with a static scale")
    tensors = {f"{prefix}.{k}": v for k, v in ct_nvfp4.to_ct(lin.w).items()}
    if act is not None:
        tensors[f"{prefix}.input_global_scale"] = ct_nvfp4.input_global_scale(lin.act_scale)
    if lin.bias is not None:
        tensors[f"{prefix}.bias"] = to_numpy(lin.bias)
    entry = {"kind": "ct-nvfp4", "w4a4": act is not None, "dtype": lin.w.dtype}
    out = Encoded(entry, list(tensors.items()), [])
    if lin.a is not None:
        entry["lora"] = {"rank": lin.rank, "dtype": to_numpy(lin.a).dtype.name}
        na, nb = lora_names(prefix)
        out.lora = [(na, np.ascontiguousarray(to_numpy(lin.a).T)), (nb, to_numpy(lin.b))]
    return out


def _encode_obj(prefix: str, obj, out: Encoded) -> dict:
    kind = _KIND_OF.get(type(obj))
    if kind is None:
        raise ValueError(f"{prefix}: a {type(obj).__name__} cannot be stored in a checkpoint")
    cls, table = _CLASSES[kind]
    names = {f.name for f in dataclasses.fields(cls)} - _RUNTIME_FIELDS
    if names != set(table):  # a new field must be added to the schema, never silently dropped
        raise ValueError(f"{prefix}: {cls.__name__} fields {sorted(names)} != schema {table}")
    fields = {}
    for name, cat in table.items():
        fields[name] = _encode_field(f"{prefix}.{name}", cat, getattr(obj, name), out)
    return {"kind": kind, "fields": fields}


def _encode_field(name: str, cat: str, v, out: Encoded):
    if v is None:
        if cat in _REQUIRED:
            raise ValueError(f"{name}: required field is None")
        return None
    if cat in (ARRAY, OPT_ARRAY) or (cat == WEIGHT and not isinstance(v, (formats.QTensor, tuple))):
        x = to_numpy(v)
        out.tensors.append((name, x))
        return _array_entry(x)
    if cat == LORA:
        return None  # written with the adapter, from the "lora" entry of the module
    if cat in (QTENSOR, WEIGHT) and isinstance(v, formats.QTensor):
        return {"qtensor": _encode_qtensor(name, v, out)}
    if cat == WEIGHT:  # tuple of QTensors
        return {"tuple": [_encode_field(f"{name}.{i}", QTENSOR, q, out) for i, q in enumerate(v)]}
    if cat == OPT_FORMAT:
        return {"format": format_entry(formats.resolve_format(v))}
    if cat == OPT_ACT:
        return str(v)
    if cat == INT:
        return int(v)
    if cat == BOOL:
        return bool(v)
    if cat == PARTS:
        return [_encode_obj(f"{name}.{i}", p, out) for i, p in enumerate(v)]
    raise ValueError(f"{name}: cannot encode a {type(v).__name__} as {cat}")


def _encode_qtensor(name: str, q: formats.QTensor, out: Encoded) -> dict:
    for part in _QT_PARTS:
        x = getattr(q, part)
        if x is not None:
            out.tensors.append((f"{name}.{part}", to_numpy(x)))
    return {
        "shape": list(q.shape),
        "axis": q.axis,
        "dtype": q.dtype,
        "format": format_entry(q.spec, q.int_rule),
        "zeros": q.zeros is not None,
    }


def add_lora_entry(entry: dict, prefix: str, lin, out: Encoded) -> None:
    """Put a ``QuantLinear``'s factors (anywhere in an ``arhq`` entry) into the adapter."""
    if isinstance(lin, QuantLinear) and lin.a is not None and entry.get("kind") == "quant":
        entry["lora"] = {"rank": lin.rank, "dtype": to_numpy(lin.a).dtype.name}
        na, nb = lora_names(prefix)
        out.lora += [(na, np.ascontiguousarray(to_numpy(lin.a).T)), (nb, to_numpy(lin.b))]
    if isinstance(lin, OutSplitLinear):
        for i, (p, e) in enumerate(zip(lin.parts, entry["fields"]["parts"], strict=True)):
            add_lora_entry(e, f"{prefix}.parts.{i}", p, out)


# ----------------------------------------------------------------------------- decode


Getter = Callable[[str], np.ndarray]


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what}")


def _type(v, types, where: str):
    """``v`` if it is an instance of ``types`` (a bool is not an int here), else the error."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(v, types) and (bool in types or not isinstance(v, bool))
    _expect(ok, where, f"expected {' or '.join(t.__name__ for t in types)}, got {type(v).__name__}")
    return v


def _keys(d, allowed: set, required: set, where: str) -> dict:
    _type(d, dict, where)
    extra, missing = set(d) - allowed, required - set(d)
    _expect(not extra, where, f"unknown keys {sorted(extra)}")
    _expect(not missing, where, f"missing keys {sorted(missing)}")
    return d


def _shape(v, where: str) -> tuple[int, ...]:
    _type(v, list, where)
    _expect(len(v) <= 4, where, "too many dimensions")
    for s in v:
        _type(s, int, where)
        _expect(0 <= s < 2**31, where, f"bad dimension {s}")
    return tuple(v)


def check_magnitude(x: np.ndarray, name: str, limit: float) -> None:
    """CheckpointError unless every value of float array ``x`` is finite with ``|x| < limit``."""
    x32 = np.asarray(x).astype(np.float32)
    bad = ~np.isfinite(x32)
    _expect(not bad.any(), name, f"{int(bad.sum())} non-finite values")
    big = float(np.abs(x32).max(initial=0.0))
    if big >= limit:
        raise CheckpointError(f"{name}: values up to {big:.3g} (|x| must stay below {limit:.0e})")


def check_tensor_scale(x: np.ndarray, name: str) -> None:
    """CheckpointError unless every value is in ``TENSOR_SCALE_RANGE`` (open interval)."""
    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    lo, hi = TENSOR_SCALE_RANGE
    ok = np.isfinite(x32) & (x32 > lo) & (x32 < hi)
    if not ok.all():
        raise CheckpointError(f"{name}: scale {x32[~ok][0]!r} outside ({lo:.0e}, {hi:.0e})")


def _checked(
    x: np.ndarray, name: str, dtype: str, shape: tuple | None, limit: float = WEIGHT_LIMIT
) -> np.ndarray:
    _expect(x.dtype.name == dtype, name, f"dtype {x.dtype.name}, expected {dtype}")
    if shape is not None:
        _expect(
            tuple(x.shape) == tuple(shape), name, f"shape {list(x.shape)}, expected {list(shape)}"
        )
    if x.dtype.kind == "f" or x.dtype.name.startswith("float8"):
        check_magnitude(x, name, limit)
    return x


def decode_format_rule(d, where: str) -> tuple[formats.FormatSpec, str]:
    """The entry's format dict → (``FormatSpec``, int rule); see ``format_entry``."""
    names = {f.name for f in dataclasses.fields(formats.FormatSpec)} - {"sign_magnitude"}
    _keys(d, names | {"int_variant"}, {"name", "bits", "block"}, where)
    kw = {}
    int_rule = "default"
    for k, v in d.items():
        if k == "tile":
            if v is not None:
                _expect(v == [16, 16], where, f"tile must be [16, 16] or null, got {v!r}")
                v = (16, 16)
        else:
            _type(v, (str, int, bool, type(None)), f"{where}.{k}")
        if k == "int_variant":
            _expect(v in _INT_VARIANTS, where, f"int_variant must be one of {_INT_VARIANTS}")
            if v == _SIGN_MAGNITUDE_VARIANT:
                kw["sign_magnitude"] = True
            else:
                int_rule = v
            continue
        kw[k] = v
    try:
        spec = formats.FormatSpec(**kw)
        return spec, formats.check_int_rule(spec, int_rule)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def decode_format(d, where: str) -> formats.FormatSpec:
    """The entry's format dict of an activation quantizer (no int rule) → ``FormatSpec``."""
    spec, int_rule = decode_format_rule(d, where)
    _expect(int_rule == "default", where, f"an activation format has no int rule ({int_rule})")
    return spec


def _array(name: str, d, get: Getter) -> jax.Array:
    d = _keys(d, {"array"}, {"array"}, name)["array"]
    _keys(d, {"dtype", "shape"}, {"dtype", "shape"}, name)
    dtype = _type(d["dtype"], str, name)
    _expect(dtype in _ARRAY_DTYPES, name, f"unsupported dtype {dtype!r}")
    return jnp.asarray(_checked(get(name), name, dtype, _shape(d["shape"], name)))


def _qtensor(name: str, d, get: Getter) -> formats.QTensor:
    d = _keys(d, {"qtensor"}, {"qtensor"}, name)["qtensor"]
    _keys(d, _QT_KEYS, _QT_KEYS, name)
    shape = _shape(d["shape"], f"{name}.shape")
    _expect(len(shape) >= 1 and math.prod(shape) > 0, name, "empty QTensor shape")
    axis = _type(d["axis"], int, f"{name}.axis")
    _expect(0 <= axis < len(shape), name, f"axis {axis} out of range for shape {list(shape)}")
    dtype = _type(d["dtype"], str, f"{name}.dtype")
    _expect(dtype in _FLOAT_DTYPES, name, f"unsupported original dtype {dtype!r}")
    spec, int_rule = decode_format_rule(d["format"], f"{name}.format")
    zeros = _type(d["zeros"], bool, f"{name}.zeros")
    # The exact layout quantize() produces for this shape and format, without computing it.
    try:
        like = jax.eval_shape(
            lambda: formats.quantize(jnp.zeros(shape, jnp.float32), spec, axis=axis)
        )
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    _expect(zeros == (like.zeros is not None), name, "zero points do not match the format")
    parts = {}
    for part in _QT_PARTS:
        ref = getattr(like, part)
        if ref is None:
            continue
        n = f"{name}.{part}"
        x = _checked(get(n), n, jnp.dtype(ref.dtype).name, ref.shape, SCALE_LIMIT)
        if part == "tensor_scale":
            check_tensor_scale(x, n)
        parts[part] = jnp.asarray(x)
    return formats.QTensor(
        codes=parts["codes"],
        scales=parts["scales"],
        tensor_scale=parts["tensor_scale"],
        zeros=parts.get("zeros"),
        shape=shape,
        spec=spec,
        axis=axis,
        dtype=dtype,
        int_rule=int_rule,
    )


def _decode_field(name: str, cat: str, v, get: Getter):
    if v is None:
        _expect(
            cat not in (ARRAY, QTENSOR, WEIGHT, INT, BOOL, PARTS), name, "required field is null"
        )
        return None
    if cat in (ARRAY, OPT_ARRAY):
        return _array(name, v, get)
    if cat == QTENSOR:
        return _qtensor(name, v, get)
    if cat == WEIGHT:
        _type(v, dict, name)
        if "array" in v:
            return _array(name, v, get)
        if "tuple" in v:
            items = _keys(v, {"tuple"}, {"tuple"}, name)["tuple"]
            _type(items, list, name)
            _expect(1 <= len(items) <= 2, name, "a mixed-precision weight has 1 or 2 parts")
            return tuple(_qtensor(f"{name}.{i}", q, get) for i, q in enumerate(items))
        return _qtensor(name, v, get)
    if cat == OPT_FORMAT:
        return decode_format(_keys(v, {"format"}, {"format"}, name)["format"], name)
    if cat == OPT_ACT:
        _expect(v in _SERQ_ACTS, name, f"unknown activation quantizer {v!r}")
        return v
    if cat == INT:
        _type(v, int, name)
        _expect(0 <= v < 2**31, name, f"bad value {v}")
        return v
    if cat == BOOL:
        return _type(v, bool, name)
    if cat == PARTS:
        _type(v, list, name)
        _expect(1 <= len(v) <= 64, name, "bad number of parts")
        return tuple(decode_obj(f"{name}.{i}", p, get, None) for i, p in enumerate(v))
    raise CheckpointError(f"{name}: unknown field category {cat}")  # pragma: no cover


def _lora(prefix: str, entry: dict, get_lora: Getter | None, in_f: int, out_f: int):
    lo = _keys(entry["lora"], {"rank", "dtype"}, {"rank", "dtype"}, f"{prefix}.lora")
    r = _type(lo["rank"], int, f"{prefix}.lora.rank")
    _expect(1 <= r <= min(in_f, out_f), prefix, f"bad LoRA rank {r}")
    dtype = _type(lo["dtype"], str, f"{prefix}.lora.dtype")
    _expect(dtype in _FLOAT_DTYPES, prefix, f"unsupported LoRA dtype {dtype!r}")
    _expect(get_lora is not None, prefix, "has a low-rank branch but the checkpoint has no lora/")
    na, nb = lora_names(prefix)
    a_t = _checked(get_lora(na), na, dtype, (r, in_f))
    b = _checked(get_lora(nb), nb, dtype, (out_f, r))
    return jnp.asarray(np.ascontiguousarray(a_t.T)), jnp.asarray(b)


def decode_obj(prefix: str, entry, get: Getter, get_lora: Getter | None):
    """An ``arhq``-kind entry → its dataclass (``get_lora`` for a QuantLinear's factors)."""
    _keys(entry, {"kind", "fields", "lora"}, {"kind", "fields"}, prefix)
    kind = entry["kind"]
    _expect(isinstance(kind, str) and kind in _CLASSES, prefix, f"unknown kind {kind!r}")
    cls, table = _CLASSES[kind]
    fields = _keys(entry["fields"], set(table), set(table), f"{prefix}.fields")
    kw = {n: _decode_field(f"{prefix}.{n}", cat, fields[n], get) for n, cat in table.items()}
    if kind == "quant":
        q = kw["w"]
        _expect(q.axis == 1 and len(q.shape) == 2, prefix, "a QuantLinear weight is 2-D, axis 1")
        if "lora" in entry:
            kw["a"], kw["b"] = _lora(prefix, entry, get_lora, q.shape[1], q.shape[0])
    else:
        _expect("lora" not in entry, prefix, f"a {kind} linear has no LoRA branch")
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{prefix}: {e}") from None


def _bias(prefix: str, get: Getter, out_f: int, dtype: str | None) -> jax.Array | None:
    if dtype is None:
        return None
    n = f"{prefix}.bias"
    return jnp.asarray(_checked(get(n), n, dtype, (out_f,)))


def decode_linear(
    prefix: str,
    entry,
    get: Getter,
    get_lora: Getter | None,
    shape: tuple[int, int],
    bias_dtype: str | None,
):
    """A module entry → its linear, checked against the model's ``shape`` = (out, in).

    ``bias_dtype``: the dtype of the bias the model config declares, or None (no bias).
    """
    _type(entry, dict, prefix)
    out_f, in_f = shape
    kind = entry.get("kind")
    if kind == "dense":
        _keys(entry, {"kind", "dtype"}, {"kind", "dtype"}, prefix)
        dtype = _type(entry["dtype"], str, f"{prefix}.dtype")
        _expect(dtype in _FLOAT_DTYPES, prefix, f"unsupported dtype {dtype!r}")
        n = f"{prefix}.weight"
        w = jnp.asarray(_checked(get(n), n, dtype, (out_f, in_f)))
        return Dense(w=w, b=_bias(prefix, get, out_f, bias_dtype))
    if kind == "ct-nvfp4":
        _keys(entry, {"kind", "w4a4", "dtype", "lora"}, {"kind", "w4a4", "dtype"}, prefix)
        w4a4 = _type(entry["w4a4"], bool, f"{prefix}.w4a4")
        wdt = _type(entry["dtype"], str, f"{prefix}.dtype")
        _expect(wdt in _FLOAT_DTYPES, prefix, f"unsupported dtype {wdt!r}")
        raw = {k: get(f"{prefix}.{k}") for k in ct_nvfp4.WEIGHT_KEYS}
        for k, x in raw.items():
            _checked(x, f"{prefix}.{k}", x.dtype.name, None, SCALE_LIMIT)  # finite scales
        check_tensor_scale(raw["weight_global_scale"], f"{prefix}.weight_global_scale")
        try:
            w = ct_nvfp4.from_ct(raw, (out_f, in_f), wdt)
        except ValueError as e:
            raise CheckpointError(f"{prefix}: {e}") from None
        # The decoded weights are at most 6 · max(s) / gs in size (E2M1 values reach 6).
        bound = 6.0 * float(np.asarray(raw["weight_scale"], np.float32).max(initial=0.0))
        bound /= float(np.asarray(raw["weight_global_scale"], np.float32).reshape(-1)[0])
        if not bound < WEIGHT_LIMIT:
            raise CheckpointError(
                f"{prefix}.weight_global_scale: decodes weights up to {bound:.3g} "
                f"(|w| must stay below {WEIGHT_LIMIT:.0e})"
            )
        act_scale = act_fmt = None
        if w4a4:
            n = f"{prefix}.input_global_scale"
            x = get(n)
            _checked(x, n, "float32", None, SCALE_LIMIT)
            check_tensor_scale(x, n)
            try:
                act_scale = jnp.asarray(ct_nvfp4.act_scale_from_input_global_scale(x))
            except ValueError as e:
                raise CheckpointError(f"{n}: {e}") from None
            act_fmt = w.spec
        a = b = None
        if "lora" in entry:
            a, b = _lora(prefix, entry, get_lora, in_f, out_f)
        bias = _bias(prefix, get, out_f, bias_dtype)
        return QuantLinear(w=w, a=a, b=b, bias=bias, act_scale=act_scale, act_fmt=act_fmt)
    lin = decode_obj(prefix, entry, get, get_lora)
    _expect(
        (lin.out_features, lin.in_features) == (out_f, in_f),
        prefix,
        f"shape [{lin.out_features}, {lin.in_features}] does not match the model's "
        f"[{out_f}, {in_f}]",
    )
    return lin
