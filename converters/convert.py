"""``convert(src, dst)``: HF dir / .gguf / "smollm2" / orbax dir -> HF dir or orbax dir.

The output is written to a temporary directory beside ``dst`` and renamed into place, so a failure
(bad input, full disk, interrupt) leaves no ``dst`` behind.
"""

from __future__ import annotations

from pathlib import Path

from converters.hf import check_replaceable, read_hf_config, save_hf_dir
from converters.orbax_io import read_orbax_metadata, save_orbax
from converters.registry import load_model, source_kind

FORMATS = ("hf", "orbax")


def output_format(dst: str | Path, format: str | None = None) -> str:
    """``format`` if given, else "orbax" when ``dst`` ends with ``.orbax``, else "hf"."""
    if format is None:
        return "orbax" if str(dst).rstrip("/").endswith(".orbax") else "hf"
    if format not in FORMATS:
        raise ValueError(f"unknown output format {format!r}; supported: {', '.join(FORMATS)}")
    return format


def stored_param_dtype(src: str | Path) -> str:
    """The parameter dtype a source holds: config.json's for HF, f32 for (dequantized) GGUF."""

    kind, path = source_kind(src)
    if kind == "gguf":
        return "float32"
    if kind == "orbax":
        return read_orbax_metadata(path)["config"]["param_dtype"]
    d = read_hf_config(path)
    stored = d.get("dtype") or d.get("torch_dtype") or "float32"
    # f16 checkpoints are widened to f32 (exact); the models run in f32 or bf16 only.
    return "bfloat16" if stored == "bfloat16" else "float32"


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    param_dtype: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
    tokenizer: bool = True,
) -> Path:
    """Convert ``src`` to ``dst`` and return ``dst``.

    Args:
      src: "smollm2", a HF directory, a .gguf file or an orbax directory of float params.
      dst: output directory; a HF directory unless ``format="orbax"`` or it ends with ``.orbax``.
      param_dtype: dtype of the written parameters; None keeps the source's (f32 for GGUF).
      overwrite: replace an existing ``dst`` (atomically) instead of raising FileExistsError;
        only a directory that ``convert`` (``save_hf_dir`` / ``save_orbax``) wrote and that holds
        nothing else, never the source itself or a directory holding it.
      tokenizer: also write the source's tokenizer, when it has one.
    """

    fmt = output_format(dst, format)
    dst = Path(dst)
    check_replaceable(dst, overwrite)  # before the (slow) load; checked again at the rename
    if dst.exists() and str(src) != "smollm2":
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or d in s.parents:
            raise FileExistsError(f"{dst} holds the source {src}; write the conversion elsewhere")
    dtype = param_dtype or stored_param_dtype(src)
    m = load_model(src, param_dtype=dtype, tokenizer=tokenizer)
    save = save_hf_dir if fmt == "hf" else save_orbax
    return save(m.cfg, m.params, dst, tokenizer=m.tokenizer, overwrite=overwrite)
