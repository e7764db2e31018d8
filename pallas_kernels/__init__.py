"""Pallas kernels: block-scaled FP4 GEMM with a fused low-rank branch (docs/spec/kernels.md).

``fp4_matmul.fp4_lowrank_matmul`` runs kernel 1 (activation quantization + x·A, ``act_quant``) and
kernel 2 (the FP4 GEMM with the t·Bᵀ epilogue). On CPU pass ``interpret=True``; on GPU the kernels
lower through Triton. ``codecs`` holds the in-kernel FP4/FP8 decoders.

This face imports nothing: import the op modules by path (``from pallas_kernels.fp4_matmul import
fp4_lowrank_matmul``). May import of the library: ``arhq_jax.numerics`` only.
"""
