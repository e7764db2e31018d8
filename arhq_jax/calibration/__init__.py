"""Calibration statistics: streamed per-linear moments (`stats`), the layerwise runner and what a
method may ask (`calibrate`), static activation and fused weight global scales.

May import: `numerics`, `linears`, `models`, `parallel`, `decomposition`.
"""
