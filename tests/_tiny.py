"""The tiny random Llama shared by the pipeline tests (its fixture ``model`` is in conftest)."""

from arhq_jax.models.config import ModelConfig

CFG = ModelConfig(
    family="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
