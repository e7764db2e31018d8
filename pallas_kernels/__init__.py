"""Pallas kernels: block-scaled FP4 GEMM with a fused low-rank branch (docs/spec/kernels.md).

``fp4_lowrank_matmul`` runs kernel 1 (activation quantization + x·A) and kernel 2 (the FP4 GEMM
with the t·Bᵀ epilogue). On CPU pass ``interpret=True``; on GPU the kernels lower through Triton.
"""

from pallas_kernels.fp4_matmul import (
    KERNEL_FORMATS,
    choose_tiles,
    fp4_lowrank_matmul,
    quantize_activations,
)

__all__ = ["KERNEL_FORMATS", "choose_tiles", "fp4_lowrank_matmul", "quantize_activations"]
