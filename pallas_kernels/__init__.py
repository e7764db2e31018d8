"""Pallas kernels: block-scaled FP4 GEMM with a fused low-rank branch (docs/spec/kernels.md).

``pallas_kernels.fp4_matmul.fp4_lowrank_matmul`` runs kernel 1 (activation quantization + x·A) and
kernel 2 (the FP4 GEMM with the t·Bᵀ epilogue). On CPU pass ``interpret=True``; on GPU the kernels
lower through Triton. Import the modules by path (``from pallas_kernels.fp4_matmul import ...``):
this package imports nothing itself.
"""
