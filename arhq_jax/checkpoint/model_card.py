"""Provenance, diagnostics and the model card of a checkpoint: who made it, how, how well, and
how to serve it.

``CheckpointWriter.finish`` writes, beside the weights and before the manifest (so each is listed
in ``manifest.json`` with its sha256, checked like any other file, and the directory stays
recognisably arhq-jax's):

::

    generation_config.json  always: the source's own (an HF directory's generation_config.json,
                            as a JSON object), else the config's bos/eos ids (a GGUF's)
    provenance.json         given a ``Card``: arhq-jax's version, the preset, the recipe
                            (``QuantConfig.to_dict``), the command line, the source model,
                            the calibration facts
    diagnostics.json        given a ``Card`` with diagnostics: one record per quantized projection
                            (layer, projection, relative weight-quantization error, rank, ARHQ
                            objective, clamped eigenvalues, max|A|, ‖BAᵀ‖/‖W‖)
    README.md               given a ``Card``: the model card (recipe, bits per weight, the
                            diagnostics summary, how to serve it with the real directory name)

Nothing here holds a timestamp or a run time: two identical runs write identical bytes. Only
``provenance.json`` and ``README.md`` record how the run was invoked (the command line, the
output name), so those two are the files that differ between the same recipe run from the
command line and from Python.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from arhq_jax import __version__
from arhq_jax.models.config import PROJECTIONS, ModelConfig
from arhq_jax.storage.jsonio import read_json
from converters.safetensors_io import read_header

PROVENANCE_FILE = "provenance.json"
DIAGNOSTICS_FILE = "diagnostics.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CARD_FILE = "README.md"
PROVENANCE_FORMAT = "arhq-jax-provenance"
DIAGNOSTICS_FORMAT = "arhq-jax-diagnostics"
# Diagnostic keys that describe the machine rather than the checkpoint (which device ran it).
_RUN_ONLY = ("device",)
_ITEMSIZE = {"U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "BOOL": 1,
             "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
             "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


@dataclasses.dataclass
class Card:
    """What the model card and provenance record beyond the checkpoint's own facts.

    Attributes:
      command: the command line (``sys.argv``) or a description of the Python call; None if
        unknown.
      preset: the preset name the recipe came from, or None.
      diagnostics: per-projection records of the run (``QuantizeResult.projections``).
      generation_config: the source model's generation settings, or None (then the config's
        bos/eos ids: ``generation_config``).
      out: the output directory as the user named it (the serving snippets use it); None: the
        directory's own name.
    """

    command: list[str] | None = None
    preset: str | None = None
    diagnostics: list[dict] | None = None
    generation_config: dict | None = None
    out: str | None = None


def package_version() -> str:
    """arhq-jax's installed version (``importlib.metadata``), else the package's own."""
    try:
        return version("arhq-jax")
    except PackageNotFoundError:
        return __version__


def source_generation_config(source) -> dict | None:
    """An HF model directory's ``generation_config.json`` as a JSON object (read as data, depth
    limited), or None for another source or a directory without one. A file that is not a
    JSON object is a ValueError naming it."""
    d = Path(str(source)).expanduser()
    f = d / GENERATION_CONFIG_FILE
    if not d.is_dir() or not f.is_file():
        return None
    doc = read_json(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{f}: not a JSON object")
    return doc


def generation_config(cfg: ModelConfig, card: Card | None = None) -> dict:
    """``generation_config.json``: the source's own, else the config's bos/eos token ids."""
    if card is not None and card.generation_config is not None:
        return dict(card.generation_config)

    def ids(x):
        return list(x) if isinstance(x, tuple) else x

    out = {}
    for key in ("bos_token_id", "eos_token_id"):
        v = getattr(cfg, key, None)
        if v is not None:
            out[key] = ids(v)
    return out


# ----------------------------------------------------------------------------- diagnostics


def clean_diagnostics(diags) -> list[dict]:
    """JSON-ready per-projection records (numbers as Python numbers, machine keys dropped)."""
    out = []
    for d in diags or []:
        rec = {k: _plain(v) for k, v in d.items() if k not in _RUN_ONLY}
        out.append(rec)
    return out


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (bool, str)) or v is None:
        return v
    x = np.asarray(v)
    if x.ndim == 0:
        return x.item()
    return x.tolist()


# (key, header, format, how the projections' values combine)
SUMMARY_COLUMNS = (
    ("w_quant_rel_err", "rel. weight err", ".4f", "mean"),
    ("rank", "rank", ".1f", "mean"),
    ("branch_rel_norm", "|BA|/|W|", ".4f", "mean"),
    ("objective", "ARHQ objective", ".4g", "mean"),
    ("max_abs_a", "max|A|", ".4g", "max"),
    ("n_clamped", "clamped eigvals", "d", "sum"),
)


def summary_rows(diags) -> list[dict]:
    """One row per projection name (q_proj…down_proj, then others) over the layers: the mean
    relative weight error, rank, branch norm and objective, the largest max|A|, the clamped
    eigenvalues summed; ``n`` the projections counted. Columns no record has are left out."""
    diags = clean_diagnostics(diags)
    names = [p for p in PROJECTIONS if any(d.get("proj") == p for d in diags)]
    names += sorted({str(d.get("proj")) for d in diags} - set(names))
    rows = []
    for p in names:
        recs = [d for d in diags if str(d.get("proj")) == p]
        row = {"proj": p, "n": len(recs)}
        for key, _, _, how in SUMMARY_COLUMNS:
            vals = [
                float(d[key])
                for d in recs
                if isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool)
            ]
            if not vals:
                continue
            v = {"mean": np.mean, "max": np.max, "sum": np.sum}[how](vals)
            row[key] = int(v) if how == "sum" else float(v)
        rows.append(row)
    return rows


def _columns(rows):
    cols = [("proj", "projection", "s"), ("n", "n", "d")]
    cols += [(k, h, f) for k, h, f, _ in SUMMARY_COLUMNS if any(k in r for r in rows)]
    return cols


def _cell(r, key, fmt) -> str:
    v = r.get(key)
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def diagnostics_text(diags) -> str:
    """The per-projection summary as an aligned terminal table ('' without diagnostics)."""
    rows = summary_rows(diags)
    if not rows:
        return ""
    cols = _columns(rows)
    cells = [[h for _, h, _ in cols]] + [[_cell(r, k, f) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = []
    for j, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def diagnostics_markdown(diags) -> str:
    rows = summary_rows(diags)
    if not rows:
        return ""
    cols = _columns(rows)
    head = " | ".join(h.replace("|", "\\|") for _, h, _ in cols)  # a bar in a cell is escaped
    lines = ["| " + head + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bits per weight


def bits_per_weight(d: Path, modules: dict, cfg: ModelConfig, lora_dir: str) -> dict | None:
    """Stored bits per weight of the quantized linears of checkpoint directory ``d`` (read from
    the safetensors headers): ``{"linears", "weights", "base", "branch", "total"}`` where base
    counts each module's model tensors (codes, scales, global scales, bias) and branch its
    adapter tensors; None when no linear is quantized."""
    quantized = {k for k, e in modules.items() if e.get("kind") != "dense"}
    if not quantized:
        return None
    shapes = cfg.linear_shapes()
    n_weights = 0
    for m in quantized:
        proj = m.rsplit(".", 1)[-1]
        n, k = shapes[proj] if proj in shapes else (cfg.vocab_size, cfg.hidden_size)
        n_weights += n * k
    base = branch = 0
    for f in sorted(d.glob("*.safetensors")) + sorted((d / lora_dir).glob("*.safetensors")):
        for name, t in read_header(f).tensors.items():
            key = name.removeprefix("base_model.model.")
            owner = next((m for m in quantized if key.startswith(m + ".")), None)
            if owner is None:
                continue
            nbytes = int(np.prod(t.shape, dtype=np.int64)) * _ITEMSIZE.get(t.dtype, 0)
            if f.parent.name == lora_dir and f.parent != d:
                branch += nbytes
            else:
                base += nbytes
    bpw = {
        "linears": len(quantized),
        "weights": n_weights,
        "base": 8 * base / n_weights,
        "branch": 8 * branch / n_weights,
    }
    bpw["total"] = bpw["base"] + bpw["branch"]
    return bpw


# ----------------------------------------------------------------------------- the files


def provenance(quant: dict, source: dict, card: Card) -> dict:
    """``provenance.json``'s document (data only: nothing in it is ever executed)."""
    recipe = {k: v for k, v in quant.items() if k not in ("timings",)}
    return {
        "format": PROVENANCE_FORMAT,
        "arhq_jax_version": package_version(),
        "preset": card.preset,
        "recipe": recipe,
        "command": None if card.command is None else [str(a) for a in card.command],
        "source": {"model": source.get("model"), "fingerprint": source.get("fingerprint")},
    }


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def write_files(
    d: Path,
    cfg: ModelConfig,
    hf: dict,
    *,
    quant: dict | None,
    source: dict | None,
    card: Card | None,
    nbytes: int,
    lora_dir: str,
    layout: str,
) -> None:
    """Write ``generation_config.json`` and, given a ``card``, ``provenance.json``,
    ``diagnostics.json`` and ``README.md`` into the directory ``d`` being filled."""
    (d / GENERATION_CONFIG_FILE).write_text(_dump(generation_config(cfg, card)))
    if card is None:
        return
    quant, source = quant or {}, source or {}
    prov = provenance(quant, source, card)
    (d / PROVENANCE_FILE).write_text(_dump(prov))
    diags = clean_diagnostics(card.diagnostics)
    if card.diagnostics is not None:
        doc = {"format": DIAGNOSTICS_FORMAT, "projections": diags}
        (d / DIAGNOSTICS_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    bpw = bits_per_weight(d, hf["arhq_jax"]["modules"], cfg, lora_dir)
    out = card.out or d.name
    text = render(cfg, hf, prov, diags, bpw, nbytes, out, layout, has_lora=(d / lora_dir).is_dir())
    (d / CARD_FILE).write_text(text)


def _recipe_line(recipe: dict) -> str:
    keys = ("method", "setting", "rank", "w_fmt", "act_fmt", "act_scale", "residual_quant",
            "modules", "sequential", "calib_tokens", "calib_source")  # fmt: skip
    parts = [f"{k}={recipe[k]}" for k in keys if recipe.get(k) is not None]
    return ", ".join(parts)


def render(cfg, hf, prov, diags, bpw, nbytes, out, layout, *, has_lora) -> str:
    """The model card's Markdown (Hugging Face's front matter, then the sections)."""
    recipe = prov["recipe"]
    src = prov["source"]["model"] or "the source model"
    q = json.dumps  # names inside code are JSON-quoted (a directory name with quotes stays code)
    ct = layout == "compressed-tensors"
    tags = ["arhq-jax", "quantized", "fp4"] + (["compressed-tensors", "nvfp4"] if ct else [])
    lines = ["---", "library_name: " + ("transformers" if ct else "arhq-jax"), "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {Path(out).name}", ""]
    lines += [
        f"{recipe.get('method', 'float')} quantization of `{src}` made with arhq-jax "
        f"{prov['arhq_jax_version']} ({cfg.family}, {cfg.num_layers} layers, hidden size "
        f"{cfg.hidden_size}).",
        "",
        "## Recipe",
        "",
    ]
    if prov["preset"]:
        lines.append(f"- preset: `{prov['preset']}`")
    lines.append(f"- recipe: {_recipe_line(recipe) or 'none recorded'}")
    if prov["command"]:
        lines.append(f"- command: `{shlex.join(prov['command'])}`")
    fp = prov["source"].get("fingerprint") or {}
    if fp.get("weights_sha256"):
        lines.append(f"- source weights digest: `{fp['weights_sha256'][:16]}…`")
    lines += ["- the full recipe, version and command: `provenance.json`", "", "## Size", ""]
    lines.append(f"- stored tensors: {nbytes / 2**20:.1f} MiB")
    if bpw is not None:
        lines.append(
            f"- bits per weight of the {bpw['linears']} quantized linears: "
            f"{bpw['total']:.3f} ({bpw['base']:.3f} quantized base + {bpw['branch']:.3f} "
            "low-rank branch)"
        )
    lines += ["", "## Measured quality", ""]
    table = diagnostics_markdown(diags)
    if table:
        lines += [
            "Per-projection diagnostics of the quantize run, over the layers (every projection "
            "in `diagnostics.json`):",
            "",
            table,
            "",
        ]
    lines += [
        "Perplexity was not measured when this directory was written; measure it with",
        "",
        "```",
        f"arhq-jax eval --model {shlex.quote(str(src))} --quantized {shlex.quote(out)}",
        "```",
        "",
        "## How to serve",
        "",
    ]
    if ct:
        lines += [
            "The base model is compressed-tensors' `nvfp4-pack-quantized`"
            + (
                " and `lora/` is a PEFT LoRA adapter (scaling 1): the model is exactly "
                '"NVFP4 base + LoRA".'
                if has_lora
                else "."
            ),  # fmt: skip
            "",
            "transformers (with compressed-tensors)" + (" and peft" if has_lora else "") + ":",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({q(out)})",
            f"tokenizer = AutoTokenizer.from_pretrained({q(out)})",
        ]
        if has_lora:
            lines += [
                "",
                "from peft import PeftModel",
                "",
                f"model = PeftModel.from_pretrained(model, {q(out + '/lora')})",
            ]
        lines += ["```", "", "vLLM (not run by arhq-jax's tests):", "", "```"]
        if has_lora:
            modules = hf["arhq_jax"]["modules"].values()
            rank = max((e.get("lora") or {}).get("rank", 0) for e in modules)
            lines.append(
                f"vllm serve {shlex.quote(out)} --enable-lora --lora-modules "
                f"arhq={shlex.quote(out + '/lora')} --max-lora-rank {max(rank, 8)}"
            )
        else:
            lines.append(f"vllm serve {shlex.quote(out)}")
        lines += ["```", ""]
        if has_lora:
            lines += [
                "`lora/adapter_config.json` names the source model in `base_model_name_or_path` "
                "(lineage); the base the adapter belongs to is the NVFP4 model in this "
                "directory, so attach it as above (`AutoPeftModelForCausalLM` would load the "
                "float source model instead).",
                "",
            ]
    else:
        lines += [
            "This recipe uses arhq-jax's own tensor layout (docs/checkpoint.md): only arhq-jax "
            "reads it.",
            "",
        ]
    lines += [
        "arhq-jax:",
        "",
        "```",
        f"arhq-jax generate --model {shlex.quote(str(src))} --quantized {shlex.quote(out)} "
        "--prompt 'Hello'",
        "```",
        "",
        "`manifest.json` holds the sha256 of every file, this card included: arhq-jax refuses to "
        "load a directory whose files changed, and never replaces one.",
        "",
    ]
    return "\n".join(lines)
