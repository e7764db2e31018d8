"""The quantization run: `QuantConfig` (`config`), the in-memory layer loop (`quantize`) and the
same loop disk to disk (`stream`).

May import every package above it: `storage`, `numerics`, `linears`, `models`, `parallel`,
`decomposition`, `calibration`, `methods`, `checkpoint`, `converters`.
"""
