"""arhq-jax: low-bit post-training quantization of LLMs in JAX/Pallas (ARHQ and baselines)."""

import importlib
import importlib.metadata
import importlib.util

# The installed distribution's version (pyproject.toml); a source tree that is not installed
# reports "0+unknown". Importing the package changes nothing in the process (no environment
# variables): the ``arhq-jax`` command sets its own thread settings (cli/main.py).
try:
    __version__ = importlib.metadata.version("arhq-jax")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = ["__version__", "load", "quantize"]


def __getattr__(name: str):
    """``arhq_jax.quantize`` / ``arhq_jax.load`` (``arhq_jax.api``), imported on first use, so
    ``import arhq_jax`` stays cheap (no jax)."""
    if name in ("quantize", "load"):
        return getattr(importlib.import_module("arhq_jax.api"), name)
    raise AttributeError(f"module 'arhq_jax' has no attribute {name!r}")


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
