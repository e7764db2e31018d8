"""Spreading work: devices (`Spread`), a layer's linears sharded over a `model` mesh axis, multi-
process launch.

May import: `numerics`, `linears`.
"""
