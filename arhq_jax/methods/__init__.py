"""The seed baselines as pure per-linear algorithms (docs/spec/methods.md §4–§8) and their pipeline
adapters.

Each algorithm module takes arrays (``W [out, in]`` in HF layout, calibration statistics) and
returns arrays or pytrees:

- ``gptq``: GPTQ (docs/spec/methods.md §5), also the residual quantizer of SVDQuant/ARHQ/SERQ/ResQ.
- ``smoothquant``: SmoothQuant scales and their folding into norms and producers
  (docs/spec/methods.md §4).
- ``awq``: FPRAG-AWQ and its dynamic-heuristic rounding (docs/spec/methods.md §6).
- ``serq``: SERQ flattening, saliency permutation and single-matrix compensation
  (docs/spec/methods.md §7).
- ``resq``: ResQ PCA bases, Haar rotations, mixed-precision quantizers, Hadamard
  (docs/spec/methods.md §8).

``layer_methods`` and ``resq_method`` wrap them as layer quantizers of
``arhq_jax.quantize_model`` (calibration, sequential order, model-level fusions); ``LAYER_METHODS``
maps each ``--method`` name to its quantizer object.
"""

from arhq_jax.methods.layer_methods import AWQMethod, GPTQMethod, SERQMethod, SmoothQuantMethod
from arhq_jax.methods.resq_method import ResQMethod

LAYER_METHODS = {
    "gptq": GPTQMethod(),
    "smoothquant": SmoothQuantMethod(),
    "awq": AWQMethod("rne"),
    "awq-dh": AWQMethod("dh"),
    "serq": SERQMethod(),
    "resq": ResQMethod(),
}
