"""Quantization methods: the pure per-linear algorithms, their pipeline adapters, the registry.

Each algorithm module takes arrays (``W [out, in]`` in HF layout, calibration statistics) and
returns arrays or pytrees:

- ``gptq``: GPTQ (docs/spec/methods.md §5), also the residual quantizer of SVDQuant, ARHQ, SERQ
  and ResQ.
- ``smoothquant``: SmoothQuant scales and their folding into norms and producers (§4).
- ``awq``: FPRAG-AWQ and its dynamic-heuristic rounding (§6).
- ``serq``: SERQ flattening, saliency permutation and single-matrix compensation (§7).
- ``resq``: ResQ PCA bases, Haar rotations, mixed-precision quantizers, Hadamard (§8).

The adapters are ``base.Method`` subclasses (``lowrank``: RTN, SVDQuant, ARHQ; ``gptq_method``;
``layer_methods``: SmoothQuant, AWQ, SERQ; ``resq_method``). ``REGISTRY`` below is the one place
a method is registered: a new method is one file with its ``Method`` subclass plus one line here.
"""

from arhq_jax.methods.base import REGISTRY, Method, MethodFormats, Options, option
from arhq_jax.methods.gptq_method import GPTQMethod
from arhq_jax.methods.layer_methods import AWQMethod, SERQMethod, SmoothQuantMethod
from arhq_jax.methods.lowrank import ARHQ, RTN, SVDQuant
from arhq_jax.methods.resq_method import ResQMethod

REGISTRY.register(RTN())
REGISTRY.register(SVDQuant())
REGISTRY.register(ARHQ())
REGISTRY.register(GPTQMethod())
REGISTRY.register(SmoothQuantMethod())
REGISTRY.register(AWQMethod("rne", "awq"))
REGISTRY.register(AWQMethod("dh", "awq-dh"))
REGISTRY.register(SERQMethod())
REGISTRY.register(ResQMethod())


def get_method(name: str) -> Method:
    """The registered method called ``name`` (ValueError naming the supported ones)."""
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "MethodFormats", "Options", "get_method", "option"]
