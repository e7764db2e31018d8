"""The quantized checkpoint on disk: save / load (`store`), the incremental writer, the per-linear
schema, the compressed-tensors nvfp4 codec, the PEFT LoRA adapter, output directories.

May import: `storage`, `numerics`, `linears`, `models`, `methods`, `converters`.
"""
