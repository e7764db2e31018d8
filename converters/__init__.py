"""Checkpoint converters: HF safetensors dirs, GGUF, orbax, and ``load_model`` / ``convert``."""

from converters.convert import convert
from converters.gguf import load_gguf, load_gguf_tokenizer
from converters.hf import load_hf_dir, save_hf_dir
from converters.orbax_io import load_orbax, save_orbax
from converters.registry import LoadedModel, load_model, smollm2_gguf_path

__all__ = [
    "LoadedModel",
    "convert",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_hf_dir",
    "load_model",
    "load_orbax",
    "save_hf_dir",
    "save_orbax",
    "smollm2_gguf_path",
]
