"""arhq-jax: low-bit post-training quantization of LLMs in JAX/Pallas (ARHQ and baselines)."""

import importlib.util
import os

# jax's CPU eigh/SVD/Cholesky call scipy's OpenBLAS, whose worker threads busy-wait: on a shared or
# oversubscribed CPU a 576×576 Cholesky then takes ~1 s instead of ~1 ms. One thread is the
# robust default; it must be set before scipy loads (jax imports it at the first linalg op), and
# an explicit user setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"


def _register_lm_eval() -> None:
    """Make ``--model arhq-jax`` resolvable in lm-eval's registry when lm-eval is installed.

    A lazy placeholder: the backend module (and jax) load only when lm-eval asks for the model.
    lm-eval's ``lm_eval.models`` table is imported first, since its ``get_model`` fills the
    registry with the built-in models only while the registry is empty.
    """

    if importlib.util.find_spec("lm_eval") is None:
        return
    try:
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry

        if "arhq-jax" not in model_registry:
            model_registry.register(
                "arhq-jax", target="arhq_jax.evaluation.lm_eval_backend:ArhqJaxLM"
            )
    except Exception:  # an incompatible lm-eval must not break `import arhq_jax`
        return


_register_lm_eval()
