"""arhq-jax: low-bit post-training quantization of LLMs in JAX/Pallas (ARHQ and baselines)."""

import os

# jax's CPU eigh/SVD/Cholesky call scipy's OpenBLAS, whose worker threads busy-wait: on a shared or
# oversubscribed CPU a 576×576 Cholesky then takes ~1 s instead of ~1 ms. One thread is the
# robust default; it must be set before scipy loads (jax imports it at the first linalg op), and
# an explicit user setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
