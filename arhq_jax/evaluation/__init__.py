"""Evaluation: perplexity / KL / top-1 (`metrics`), per-layer SNR, corpora, the CLI's evaluation
loop (`pipeline`), reports, the lm-evaluation-harness backend.

May import: `storage`, `numerics`, `linears`, `models`, `calibration`, `checkpoint`,
`converters`.
"""
