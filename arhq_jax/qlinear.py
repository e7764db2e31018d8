"""``QuantLinear``: the packed quantized linear, on plain jnp (XLA) or the Pallas kernels.

    y = Q_a(x/s) · deq(W_res)ᵀ + ((x/s)·A)·Bᵀ (+ bias)                 (docs/spec/kernels.md §1)

``quant_matmul_ref`` is the jnp reference path (the ground truth of every kernel test): f32 upcast,
x/s (as x·fl32(1/s), see ``smooth_input``), ``formats.fake_quant`` of it (the low-rank branch
reads the *unquantized* x/s), dequantized weights in f32, matmuls at ``Precision.HIGHEST`` with
f32 accumulation. ``kernel="pallas"`` runs ``pallas_kernels.fp4_lowrank_matmul`` instead
(nvfp4/mxfp4 only; ``interpret=True`` on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arhq_jax import formats
from arhq_jax.formats import smooth_input, smooth_reciprocal  # noqa: F401 (public here too)
from arhq_jax.linear import WeightFeatures, add_bias, lowrank_branch, matmul_nt
from pallas_kernels.fp4_matmul import KERNEL_FORMATS, fp4_lowrank_matmul

KERNELS = ("xla", "pallas")


def quant_matmul_ref(
    x: jax.Array,
    w: formats.QTensor,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    smooth: jax.Array | None = None,
    act_fmt=None,
    *,
    bias: jax.Array | None = None,
    act_tensor_scale=None,
    a16_bf16: bool = False,
) -> jax.Array:
    """The jnp path: y ``[..., N]`` in x's dtype for x ``[..., K]`` and a QTensor w ``[N, K]``.

    Args:
      x: ``[..., K]`` f32 or bf16.
      w: the quantized residual (any format of ``formats``; blocks along K).
      a, b: low-rank factors ``[K, r]``, ``[N, r]`` (upcast to f32) or None.
      smooth: ``[K]`` divisor s, or None.
      act_fmt: activation format (name or FormatSpec) or None (weight-only, W4A16).
      bias: ``[N]`` or None.
      act_tensor_scale: static nvfp4 activation tensor scale in the activation format's
        convention (``formats.nvfp4_tensor_scale`` of a calibrated amax: gs = 2688/amax for
        "nvfp4", g = amax/2688 for "nvfp4-modelopt"); None = dynamic, from max|x/s| over all of x.
      a16_bf16: weight-only fast mode: x/s rounded to bf16 before the main matmul (matches the
        kernel's ``a16_bf16``); the low-rank branch still reads f32 x/s.
    """
    wd = formats.dequantize(w, jnp.float32)
    return lowrank_matmul(
        x,
        wd,
        a,
        b,
        smooth,
        act_fmt,
        bias=bias,
        act_tensor_scale=act_tensor_scale,
        a16_bf16=a16_bf16,
    )


def lowrank_matmul(
    x: jax.Array,
    wd: jax.Array,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    smooth: jax.Array | None = None,
    act_fmt=None,
    *,
    bias: jax.Array | None = None,
    act_tensor_scale=None,
    a16_bf16: bool = False,
) -> jax.Array:
    """``quant_matmul_ref`` on an already dequantized residual ``wd [N, K]`` (f32)."""
    xs = smooth_input(x, smooth)
    if act_fmt is not None:
        xq = formats.fake_quant(xs, act_fmt, tensor_scale=act_tensor_scale)
    elif a16_bf16:
        xq = xs.astype(jnp.bfloat16).astype(jnp.float32)
    else:
        xq = xs
    y = matmul_nt(xq, wd)
    if a is not None:
        y = y + lowrank_branch(xs, a, b)
    return add_bias(y, bias).astype(x.dtype)  # the bias after the branch: the kernels' order


class _ActQuantized(WeightFeatures):
    """What ``QuantLinear`` and ``FakeQuantLinear`` share beyond their weight's shape."""

    def weights_only(self):
        """The same linear with its activation quantizer off."""
        return self.replace(act_fmt=None, act_scale=None)


@struct.dataclass
class QuantLinear(_ActQuantized):
    """A quantized projection satisfying ``arhq_jax.linear.Linear``.

    Attributes:
      w: packed residual ``QTensor`` of shape ``[out, in]``, blocks along in.
      a: ``[in, r]`` down-projection of the float low-rank branch, or None (rank 0).
      b: ``[out, r]`` up-projection, or None.
      smooth: ``[in]`` f32 smoothing divisor s (the runtime computes x·fl32(1/s)), or None.
      bias: ``[out]`` or None.
      act_scale: static nvfp4 activation tensor scale (f32 scalar) in ``act_fmt``'s convention
        (gs = 2688/amax for "nvfp4", what compressed-tensors stores as ``input_global_scale``;
        g = amax/2688 for "nvfp4-modelopt"), or None for the dynamic scale from max|x/s|.
      act_fmt: (static) activation format name/FormatSpec, or None for weight-only (W4A16).
      kernel: (static) "xla" (plain jnp) or "pallas".
      interpret: (static) run the Pallas kernels in interpret mode (CPU).
    """

    w: formats.QTensor
    a: jax.Array | None = None
    b: jax.Array | None = None
    smooth: jax.Array | None = None
    bias: jax.Array | None = None
    act_scale: jax.Array | None = None
    act_fmt: formats.FormatSpec | str | None = struct.field(pytree_node=False, default=None)
    kernel: str = struct.field(pytree_node=False, default="xla")
    interpret: bool = struct.field(pytree_node=False, default=False)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"shape mismatch: x {tuple(x.shape)} has last axis != in_features "
                f"{self.in_features}"
            )
        if self.kernel == "pallas":
            return fp4_lowrank_matmul(
                x,
                self.w,
                self.a,
                self.b,
                self.smooth,
                self.act_fmt,
                bias=self.bias,
                act_tensor_scale=self.act_scale,
                interpret=self.interpret,
            )
        if self.kernel != "xla":
            raise ValueError(f"unknown kernel {self.kernel!r}; supported: {', '.join(KERNELS)}")
        return quant_matmul_ref(
            x,
            self.w,
            self.a,
            self.b,
            self.smooth,
            self.act_fmt,
            bias=self.bias,
            act_tensor_scale=self.act_scale,
        )

    @classmethod
    def from_float(
        cls,
        w_res: jax.Array,
        a: jax.Array | None,
        b: jax.Array | None,
        w_fmt,
        act_fmt,
        smooth: jax.Array | None = None,
        bias: jax.Array | None = None,
        factor_dtype=None,
        *,
        act_scale=None,
        w_tensor_scale=None,
        kernel: str = "xla",
        interpret: bool = False,
    ) -> QuantLinear:
        """Quantize a float residual ``w_res [out, in]`` (``formats.quantize`` along in), wrap it.

        ``a [in, r]`` / ``b [out, r]`` are stored in ``factor_dtype`` (default: as given);
        ``smooth [in]`` must be positive and finite. ``act_scale``: static nvfp4 activation
        global scale (None: dynamic); ``w_tensor_scale``: nvfp4 weight global scale (None: from
        ``w_res``; pass a joint one to share it across fused partitions). Raises ValueError on
        mismatched shapes, unknown formats or kernels.
        """
        w_res = jnp.asarray(w_res)
        if w_res.ndim != 2:
            raise ValueError(f"w_res must be 2-D [out, in], got shape {tuple(w_res.shape)}")
        out_f, in_f = w_res.shape
        if (a is None) != (b is None):
            raise ValueError("give both low-rank factors a [in, r] and b [out, r], or neither")
        if a is not None:
            a, b = jnp.asarray(a), jnp.asarray(b)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != in_f or b.shape[0] != out_f:
                raise ValueError(
                    f"low-rank factor shapes a {tuple(a.shape)}, b {tuple(b.shape)} do not match "
                    f"w_res [out={out_f}, in={in_f}]"
                )
            if a.shape[1] != b.shape[1]:
                raise ValueError(f"rank mismatch: a has {a.shape[1]} columns, b has {b.shape[1]}")
            if a.shape[1] == 0:
                a = b = None
            elif factor_dtype is not None:
                a, b = a.astype(factor_dtype), b.astype(factor_dtype)
        if smooth is not None:
            smooth = jnp.asarray(smooth, jnp.float32)
            if smooth.shape != (in_f,):
                raise ValueError(f"smooth must have shape ({in_f},), got {tuple(smooth.shape)}")
            s = np.asarray(smooth)
            if not (np.all(np.isfinite(s)) and np.all(s > 0)):
                raise ValueError("smooth must be positive and finite")
        if bias is not None:
            bias = jnp.asarray(bias)
            if bias.shape != (out_f,):
                raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        act = None if act_fmt is None else formats.resolve_format(act_fmt)
        if act_scale is not None:
            if act is None or act.name != "nvfp4":
                raise ValueError("act_scale applies to nvfp4 activations only")
            act_scale = jnp.asarray(act_scale, jnp.float32).reshape(())
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; supported: {', '.join(KERNELS)}")
        w = formats.quantize(w_res, w_fmt, axis=-1, tensor_scale=w_tensor_scale)
        lin = cls(
            w=w,
            a=a,
            b=b,
            smooth=smooth,
            bias=bias,
            act_scale=act_scale,
            act_fmt=act,
            kernel=kernel,
            interpret=interpret,
        )
        if kernel == "pallas":
            _check_pallas(lin)
        return lin


def _check_pallas(lin: QuantLinear) -> None:

    for what, spec in (("weight", lin.w.spec), ("activation", lin.act_fmt)):
        if spec is None:
            continue
        spec = formats.resolve_format(spec)
        if spec.name not in KERNEL_FORMATS or spec.scale_rule != "floor":
            raise ValueError(
                f"{what} format {spec.label!r} (scale_rule {spec.scale_rule}) is not supported by "
                f"the Pallas kernel (supported: {', '.join(KERNEL_FORMATS)}, floor rule)"
            )


def with_kernel(params, kernel: str, interpret: bool = False):
    """Switch every ``QuantLinear`` in a pytree to ``kernel`` ("xla" | "pallas").

    Raises ValueError for an unknown kernel, or when a layer's format has no Pallas kernel.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; supported: {', '.join(KERNELS)}")

    def switch(node):
        if isinstance(node, QuantLinear):
            node = node.replace(kernel=kernel, interpret=interpret)
            if kernel == "pallas":
                _check_pallas(node)
        return node

    return jax.tree_util.tree_map(switch, params, is_leaf=lambda n: isinstance(n, QuantLinear))


@struct.dataclass
class FakeQuantLinear(_ActQuantized):
    """The simulation form of a ``QuantLinear``: the residual held dequantized in f32.

    Same output as the packed linear (bit for bit on the jnp path), 8× the weight memory; it is
    what reference implementations run, and the benchmarks' "fake-quant" forward.
    """

    w: jax.Array  # [out, in] f32, dequantized residual
    a: jax.Array | None = None
    b: jax.Array | None = None
    smooth: jax.Array | None = None
    bias: jax.Array | None = None
    act_scale: jax.Array | None = None
    act_fmt: formats.FormatSpec | str | None = struct.field(pytree_node=False, default=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return lowrank_matmul(
            x,
            self.w,
            self.a,
            self.b,
            self.smooth,
            self.act_fmt,
            bias=self.bias,
            act_tensor_scale=self.act_scale,
        )


def dequantized(params):
    """Replace every ``QuantLinear`` of a pytree by its ``FakeQuantLinear``."""

    def conv(node):
        if isinstance(node, QuantLinear):
            return FakeQuantLinear(
                formats.dequantize(node.w, jnp.float32),
                node.a,
                node.b,
                node.smooth,
                node.bias,
                node.act_scale,
                act_fmt=node.act_fmt,
            )
        return node

    return jax.tree_util.tree_map(conv, params, is_leaf=lambda n: isinstance(n, QuantLinear))


def weights_only(params):
    """The same model with every quantized linear's activations left unquantized (W4A16 form).

    What any consumer of the stored weights gets: the packed/dequantized weights, low-rank
    factors, smoothing divisors, permutations and rotations are kept as they are; only the
    activation quantizer is switched off (``QuantLinear`` / ``FakeQuantLinear``: ``act_fmt`` and
    the static ``act_scale`` → None; ``SERQLinear``: ``act`` → None; ``ResQLinear``: ``act_low``
    → None, which disables its mixed activation quantizer, ``act_high`` then being unused, as
    in ResQ's own weight-only linears). ``OutSplitLinear`` parts are reached through the pytree.
    A pure function of the pytree; float leaves and other nodes are returned unchanged. Every
    quantized linear class implements ``weights_only()`` (the protocol this walks).
    """

    return jax.tree_util.tree_map(
        lambda n: n.weights_only() if _has_weights_only(n) else n, params, is_leaf=_has_weights_only
    )


def _has_weights_only(node) -> bool:
    """A quantized linear: it knows how to switch its activation quantizer off."""
    return callable(getattr(type(node), "weights_only", None))
