"""Linears: the pluggable linear interface and its one matmul policy (`base`), the quantized linear
(`quantized`).

May import: `numerics`, `pallas_kernels`.
"""
