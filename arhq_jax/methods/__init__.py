"""The seed baselines as pure per-linear algorithms (methods.md §4–§8).

Each module takes arrays (``W [out, in]`` in HF layout, calibration statistics) and returns arrays
or pytrees; the whole-model pipeline (calibration, sequential order, CLI) lives elsewhere.

- ``gptq``: GPTQ (§5), also the residual quantizer of SVDQuant/ARHQ/SERQ/ResQ.
- ``smoothquant``: SmoothQuant scales and their folding into norms and producers (§4).
- ``awq``: FPRAG-AWQ and its dynamic-heuristic rounding (§6).
- ``serq``: SERQ flattening, saliency permutation and single-matrix compensation (§7).
- ``resq``: ResQ PCA bases, Haar rotations, mixed-precision quantizers, Hadamard (§8).
"""
