"""Low-rank algorithms (pure): ARHQ / SVDQuant splits and smoothing (`decompose`), joint
refinement, rank budgets, block-Hadamard rotation, searched NVFP4 block scales.

May import: `numerics`, `linears`, `models`.
"""
