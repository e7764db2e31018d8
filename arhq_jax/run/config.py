"""``QuantConfig``: what to quantize, how, and in which formats. Validated once, up front.

A recipe is the common fields (method, formats, modules, calibration order and statistics, the
nvfp4 scale choices) plus the method's own options object (``methods.base.Options``, a frozen
dataclass the method owns and validates). ``QuantConfig(method="arhq", rank=16)`` routes the
keyword ``rank`` into ``ARHQOptions``; an option the method does not use is an error naming both.
A common field left at ``"default"`` (or None) takes the method's native default
(``method.formats``), so ``QuantConfig(method="awq")`` is FPRAG's int4-asym g128 weight-only
recipe and ``QuantConfig()`` is still ARHQ in NVFP4 W4A4 at rank 32. The method's options read
as attributes (``qcfg.rank``); an option of another method reads as None.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from arhq_jax.methods import REGISTRY
from arhq_jax.methods.base import (  # noqa: F401 (public here too)
    LINEAR_FORMATS,
    RESIDUAL_QUANTS,
    SETTINGS,
    MethodFormats,
    Options,
    option_fields,
)
from arhq_jax.models.config import INPUT_GROUPS, PROJECTIONS, ModelConfig
from arhq_jax.models.params import linear_key
from arhq_jax.numerics.formats import resolve_format

# The methods registered at import (``REGISTRY`` is the live list).
METHODS = REGISTRY.names()
# The low-rank family (ARHQ and its references).
LOWRANK_METHODS = ("rtn", "svdquant", "arhq")
# nvfp4 activation tensor scale: calibrated once per linear input, or max|x| of each call.
ACT_SCALES = ("static", "dynamic")
MODULES = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn": ("gate_proj", "up_proj", "down_proj"),
    "all": PROJECTIONS,
}
DEFAULT = "default"
# The fields common to every method (everything else is a method option).
COMMON_FIELDS = (
    "method",
    "w_fmt",
    "act_fmt",
    "modules",
    "sequential",
    "stats_dtype",
    "group_size",
    "act_group_size",
    "act_scale",
    "fused_w_scale",
)
# Per-module control (``ignore``, ``overrides``): projections left in float, and weight formats
# per module pattern. Only for the methods whose projections are quantized independently of
# their neighbours (a smoothing folded across a group, a whole-model plan or rotation could not
# leave one projection out).
MODULE_FIELDS = ("ignore", "overrides")
PER_MODULE_METHODS = ("rtn", "svdquant", "arhq", "gptq")
OVERRIDE_KEYS = ("match", "format")


def method_formats(method: str) -> MethodFormats:
    """The formats a registered method supports, with its native defaults."""
    return REGISTRY[method].formats


def supported_formats(method: str) -> dict:
    """``{"weights": [...], "activations": [...]}`` of a method (None shown as "none")."""
    mf = method_formats(method)
    return {
        "weights": list(mf.weights),
        "activations": ["none" if a is None else a for a in mf.acts],
    }


def _all_option_names() -> set[str]:
    return set(REGISTRY.all_options())


@dataclasses.dataclass(frozen=True, init=False)
class QuantConfig:
    """One quantization recipe: the common fields and ``options``, the method's options.

    Attributes:
      method: a registered method name (``METHODS``).
      w_fmt: weight format; ``"default"``: the method's native one.
      act_fmt: runtime activation format, or None for weight-only; ``"default"``: native.
      modules: ``attn``, ``ffn`` or ``all``.
      sequential: calibrate layer l on a model whose layers before l are already quantized;
        None: the method's default (GPTQ, AWQ, ResQ: True; others False).
      stats_dtype: accumulation dtype of calibration statistics (float32 or float64).
      group_size: int weight group along ``in`` (-1: per output row); None: the method's default.
      act_group_size: int activation group along ``in`` (-1: per token) for the methods that run
        ``QuantLinear``; None: the method's default (SmoothQuant: per token; others the
        format's 128). SERQ, ResQ and AWQ have their own activation quantizer.
      act_scale: nvfp4 activations only: ``"static"`` (default there: each quantized linear
        stores the global scale of its input amax measured on the calibration set, one per
        input group, so outputs never depend on batch composition) or ``"dynamic"`` (max|x| of
        every call, over the whole batch); None for recipes without nvfp4 activations (giving a
        value there is an error).
      fused_w_scale: nvfp4 weights only: one weight global scale shared by the fused partitions
        q/k/v and gate/up (computed jointly over the residuals that get quantized), as serving
        engines store them; None: on for the methods that pack plain ``QuantLinear`` s (rtn,
        svdquant, arhq, gptq, smoothquant) with nvfp4 weights, off otherwise. True where it
        does not apply is an error.
      options: the method's ``Options`` (e.g. ``ARHQOptions(rank=32, ...)``); built from the
        keyword options when not given (``QuantConfig(method="arhq", rank=16)``).
      ignore: module name patterns (shell-style, e.g. ``"layers.0.*"``, ``"*.down_proj"``,
        matched against ``model.layers.3.mlp.down_proj`` with or without ``model.``) of the
        projections left in float.
      overrides: ``(pattern, weight format)`` pairs (from ``[{"match": ..., "format": ...}]``):
        the matching projections' weights in that format (the last match wins); the other
        settings are the recipe's. Both only for ``PER_MODULE_METHODS``.
    """

    method: str
    w_fmt: str
    act_fmt: str | None
    modules: str
    sequential: bool | None
    stats_dtype: str
    group_size: int | None
    act_group_size: int | None
    act_scale: str | None
    fused_w_scale: bool | None
    options: Options
    ignore: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...]

    def __init__(
        self,
        method: str = "arhq",
        *,
        w_fmt: str = DEFAULT,
        act_fmt: str | None = DEFAULT,
        modules: str = "all",
        sequential: bool | None = None,
        stats_dtype: str = "float32",
        group_size: int | None = None,
        act_group_size: int | None = None,
        act_scale: str | None = None,
        fused_w_scale: bool | None = None,
        options: Options | None = None,
        ignore=(),
        overrides=(),
        **method_options,
    ):
        m = REGISTRY[method]  # ValueError naming the registered methods
        known = option_fields(m.Options)
        for k in method_options:
            if k not in known:
                raise ValueError(_not_an_option(k, method))
        if options is None:
            options = m.Options(**method_options)
        else:
            if type(options) is not m.Options:
                raise ValueError(
                    f"{method} takes {m.Options.__name__}, got {type(options).__name__}"
                )
            options = dataclasses.replace(options, **method_options)
        given = set(method_options)
        put = object.__setattr__.__get__(self)
        for k, v in (
            ("method", method),
            ("w_fmt", w_fmt),
            ("act_fmt", act_fmt),
            ("modules", modules),
            ("sequential", sequential),
            ("stats_dtype", stats_dtype),
            ("group_size", group_size),
            ("act_group_size", act_group_size),
            ("act_scale", act_scale),
            ("fused_w_scale", fused_w_scale),
            ("options", options),
        ):
            put(k, v)
        self._resolve(m, given)
        put("ignore", _ignore_patterns(ignore))
        put("overrides", _override_rules(overrides))
        self._resolve_modules()

    def _resolve_modules(self) -> None:
        """Check ``ignore`` / ``overrides`` and build the recipe of each override's format."""
        variants = {}
        if self.ignore or self.overrides:
            if self.method not in PER_MODULE_METHODS or self.rank_budget or self.rotate:
                raise ValueError(
                    f"ignore/overrides apply to {', '.join(PER_MODULE_METHODS)} (without "
                    f"rank_budget or rotate); not to {self.label()}"
                )
        for i, (_, fmt) in enumerate(self.overrides):
            if fmt not in variants and fmt != self.w_fmt:
                try:
                    variants[fmt] = self._with_weight_format(fmt)
                except ValueError as e:
                    raise ValueError(f"overrides[{i}] format {fmt}: {e}") from None
        self.__dict__["_variants"] = variants  # not a field: equality and hash ignore it

    def _with_weight_format(self, fmt: str) -> QuantConfig:
        """This recipe with weights in ``fmt`` (the int group size and the fused nvfp4 weight
        scale carried over where they still apply, else the method's defaults)."""
        same_kind = resolve_format(fmt).is_int and self.w_spec.is_int
        both_nvfp4 = resolve_format(fmt).name == self.w_spec.name == "nvfp4"
        return QuantConfig(
            self.method,
            w_fmt=fmt,
            act_fmt=self.act_fmt,
            modules=self.modules,
            sequential=self.sequential,
            stats_dtype=self.stats_dtype,
            group_size=self.group_size if same_kind else None,
            act_group_size=self.act_group_size,
            act_scale=self.act_scale,
            fused_w_scale=self.fused_w_scale if both_nvfp4 else None,
            options=self.options,
        )

    def module_recipe(self, layer_idx: int, proj: str) -> QuantConfig | None:
        """The recipe of projection ``proj`` of layer ``layer_idx``: None when ``ignore`` leaves
        it in float, else this recipe with the last matching override's weight format."""
        name = linear_key(layer_idx, proj)
        if any(_matches(p, name) for p in self.ignore):
            return None
        fmt = self.w_fmt
        for pattern, f in self.overrides:
            if _matches(pattern, name):
                fmt = f
        return self if fmt == self.w_fmt else self.__dict__["_variants"][fmt]

    def split_projections(self, layer_idx: int, projs) -> list[tuple[QuantConfig, list[str]]]:
        """``projs`` of layer ``layer_idx`` grouped by their recipe (``module_recipe``), ignored
        ones left out, in order of first appearance: ``[(self, projs)]`` without ignore or
        overrides."""
        out: dict[int, tuple[QuantConfig, list[str]]] = {}
        for p in projs:
            q = self.module_recipe(layer_idx, p)
            if q is not None:
                out.setdefault(id(q), (q, []))[1].append(p)
        return list(out.values())

    def _resolve(self, m, given: set) -> None:
        mf = m.formats
        put = object.__setattr__.__get__(self)
        _one_of("modules", self.modules, tuple(MODULES))
        # Per-method defaults (resolved here, so to_dict() records what actually ran).
        put("w_fmt", mf.w_default if self.w_fmt == DEFAULT else self.w_fmt)
        put("act_fmt", mf.act_default if self.act_fmt == DEFAULT else self.act_fmt)
        if self.sequential is None:
            put("sequential", mf.sequential_default)
        _one_of("weight format", self.w_fmt, LINEAR_FORMATS)
        if self.group_size is None and mf.group_default is not None:
            if resolve_format(self.w_fmt).is_int:
                put("group_size", mf.group_default)
        if self.act_group_size is None and mf.act_group_default is not None:
            if self.act_fmt in LINEAR_FORMATS and resolve_format(self.act_fmt).is_int:
                put("act_group_size", mf.act_group_default)
        m.check(self)  # the method's own cross-checks (e.g. arhq needs activations) come first
        self._check_formats(m)
        self._resolve_scales(m)
        if self.stats_dtype not in ("float32", "float64"):
            raise ValueError(f"stats_dtype must be float32 or float64, got {self.stats_dtype!r}")
        self.options.check(self)
        unused = sorted(given & set(self.options.unused(self)))
        if unused:
            raise ValueError(
                f"option {unused[0]} does not apply to {self.method} in this recipe "
                f"({self.options.__class__.__name__}: it has no effect here)"
            )

    def __getattr__(self, name: str):
        # Only reached for names that are not fields: the method's options, then None for an
        # option of another method.
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        opts = self.__dict__.get("options")
        if opts is not None and hasattr(opts, name):
            return getattr(opts, name)
        if name in _all_option_names():
            return None
        raise AttributeError(f"QuantConfig has no attribute {name!r}")

    def replace(self, **changes) -> QuantConfig:
        """A copy with common fields and/or options changed (``qcfg.replace(rank=8)``)."""
        fields = (*COMMON_FIELDS, *MODULE_FIELDS)
        kw = {k: getattr(self, k) for k in fields}
        opts = {k: v for k, v in changes.items() if k not in fields}
        kw.update({k: v for k, v in changes.items() if k in fields})
        if kw["method"] != self.method:
            return QuantConfig(**kw, **opts)
        return QuantConfig(**kw, options=self.options, **opts)

    @property
    def method_impl(self):
        """The registered ``Method`` object."""
        return REGISTRY[self.method]

    def _check_formats(self, m) -> None:
        mf = m.formats
        _one_of("weight format", self.w_fmt, LINEAR_FORMATS)
        if self.act_fmt is not None:
            _one_of("activation format", self.act_fmt, LINEAR_FORMATS)
        if self.w_fmt not in mf.weights:
            raise ValueError(
                f"{self.method} does not support weight format {self.w_fmt!r}; supported: "
                f"{', '.join(mf.weights)}"
            )
        acts = mf.acts if mf.paths is None else mf.paths[self.w_fmt]
        if self.act_fmt not in acts:
            names = ", ".join("none (weight-only)" if a is None else a for a in acts)
            what = "weight-only" if self.act_fmt is None else f"activation format {self.act_fmt!r}"
            raise ValueError(
                f"{self.method} with weights in {self.w_fmt} does not support {what}; "
                f"supported activation formats: {names}"
            )
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or not (
                self.group_size > 0 or self.group_size == -1
            ):
                raise ValueError(f"group size must be a positive int or -1, got {self.group_size}")
            if not self.w_spec.is_int:
                raise ValueError(
                    f"group size applies to int weight formats; {self.w_fmt} has fixed blocks"
                )
        if self.act_group_size is not None:
            if m.own_act_quantizer:
                raise ValueError(
                    f"{self.method} has its own activation quantizer; no act group size"
                )
            if self.act_fmt is None or not resolve_format(self.act_fmt).is_int:
                raise ValueError("act group size applies to int activation formats")
            if not isinstance(self.act_group_size, int) or not (
                self.act_group_size > 0 or self.act_group_size == -1
            ):
                raise ValueError(
                    f"act group size must be a positive int or -1, got {self.act_group_size}"
                )
        resolve_format(self.w_fmt)

    def _resolve_scales(self, m) -> None:
        put = object.__setattr__.__get__(self)
        if self.act_fmt is not None and resolve_format(self.act_fmt).name == "nvfp4":
            if self.act_scale is None:
                put("act_scale", "static")
            _one_of("activation scale", self.act_scale, ACT_SCALES)
        elif self.act_scale is not None:
            what = "weight-only" if self.act_fmt is None else f"activations in {self.act_fmt}"
            raise ValueError(f"act_scale applies to nvfp4 activations only; this recipe is {what}")
        applies = resolve_format(self.w_fmt).name == "nvfp4" and m.fused_w_scale
        if self.fused_w_scale is None:
            put("fused_w_scale", applies)
        elif not isinstance(self.fused_w_scale, bool):
            raise ValueError(f"fused_w_scale must be True or False, got {self.fused_w_scale!r}")
        elif self.fused_w_scale and not applies:
            fused = [n for n in REGISTRY if REGISTRY[n].fused_w_scale]
            raise ValueError(
                "fused_w_scale applies to nvfp4 weights of "
                f"{', '.join(fused)}; not to {self.method} with {self.w_fmt} weights"
            )

    @property
    def static_act_scale(self) -> bool:
        """True when nvfp4 activations use a calibrated static global scale."""
        return self.act_scale == "static"

    @property
    def w_spec(self):
        """The weight ``FormatSpec`` (with ``group_size`` applied to int formats)."""
        spec = resolve_format(self.w_fmt)
        if self.group_size is not None and spec.is_int:
            spec = resolve_format(spec, group_size=self.group_size)
        return spec

    @property
    def act_spec(self):
        """The activation ``FormatSpec`` (``act_group_size`` applied), or None (weight-only)."""
        if self.act_fmt is None:
            return None
        spec = resolve_format(self.act_fmt)
        if self.act_group_size is not None and spec.is_int:
            spec = resolve_format(spec, group_size=self.act_group_size)
        return spec

    @property
    def projections(self) -> tuple[str, ...]:
        return MODULES[self.modules]

    @property
    def groups(self) -> tuple[str, ...]:
        """Input groups that feed at least one quantized projection, in layer order."""
        return tuple(g for g, ps in INPUT_GROUPS.items() if set(ps) & set(self.projections))

    @property
    def uses_branch(self) -> bool:
        """A float low-rank branch is part of the recipe (svdquant/arhq with rank > 0)."""
        return bool(getattr(self.method_impl, "branch", False)) and self.rank > 0

    def check_model(self, cfg: ModelConfig) -> None:
        """Reject a recipe that does not fit ``cfg`` (a rank, or SERQ's r, above a quantized
        projection's size; an ignore or override pattern that names none of its projections)."""
        self.method_impl.check_model(self, cfg)
        names = [linear_key(i, p) for i in range(cfg.num_layers) for p in self.projections]
        for what, patterns in (
            ("ignore", self.ignore),
            ("overrides", [m for m, _ in self.overrides]),
        ):
            for i, pattern in enumerate(patterns):
                if not any(_matches(pattern, n) for n in names):
                    raise ValueError(
                        f"{what}[{i}] {pattern!r} matches none of the quantized projections "
                        f"(e.g. {names[0]!r}; patterns are shell-style: 'layers.0.*', "
                        "'*.down_proj')"
                    )

    def to_dict(self) -> dict:
        """The recipe as flat data: the common fields and the options that apply here."""
        skip = set(self.options.unused(self))
        opts = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in skip}
        out = {**{k: getattr(self, k) for k in COMMON_FIELDS}, **opts}
        if self.ignore:  # recorded only when given: recipes without them read as before
            out["ignore"] = list(self.ignore)
        if self.overrides:
            out["overrides"] = [{"match": m, "format": f} for m, f in self.overrides]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """The inverse of ``to_dict`` (ValueError for a key that is not a setting)."""
        unknown = set(d) - set(COMMON_FIELDS) - set(MODULE_FIELDS) - _all_option_names()
        if unknown:
            raise ValueError(f"unknown quantization settings: {sorted(unknown)}")
        return cls(**d)

    def label(self) -> str:
        if self.uses_branch or self.method == "serq":
            rank = f"-r{self.rank}"
        else:
            rank = ""
        res = "+gptq" if self.residual_quant == "gptq" and self.method != "gptq" else ""
        act = self.act_fmt or "w-only"
        if self.act_group_size is not None:
            act += f"-g{self.act_group_size}" if self.act_group_size > 0 else "-token"
        w = self.w_fmt
        if self.group_size is not None and resolve_format(self.w_fmt).is_int:
            w += f"-g{self.group_size}" if self.group_size > 0 else "-row"
        if self.act_scale == "dynamic":
            act += "-dyn"
        setting = f"-{self.setting}" if self.setting is not None else ""
        # the beyond-ARHQ options of the low-rank methods (None elsewhere)
        extra = "-budget" if self.rank_budget else ""
        extra += f"-b{self.bits_target:g}" if self.bits_target is not None else ""
        extra += f"-refine{self.refine_iters}" if self.refine_iters else ""
        extra += f"-rot{self.rotate}" if self.rotate else ""
        extra += "-aa" if self.act_aware else ""
        extra += "-rgptq" if self.refine_gptq else ""
        extra += "-mse" if self.mse_clip else ""
        return f"{self.method}{rank}{extra}{res}{setting}-{w}/{act}"


# named recipes (``--preset``), expanded to QuantConfig arguments. best-w4a4: hardware
# NVFP4 W4A4 (static activation scales), at most 6.0 stored bits per weight over the seven
# projections (4.5 for codes and block scales + 1.47 for the rank-32 bf16 factors), the best
# combination measured on SmolLM2 (docs/beyond_arhq.md, benchmarks/results/beyond_w4a4.md): ARHQ
# r32 raw, GPTQ residual with searched E4M3 block scales (mse_clip), 3 refinement iterations,
# sequential calibration. Rotation hurt, the rank budget traded KL for perplexity, the
# activation-aware residual target and GPTQ inside the refinement raised perplexity, act-order
# lowered KL but raised perplexity, smoothing is not combined with the refinement; none is in.
_BEST_W4A4 = dict(
    method="arhq",
    setting="raw",
    rank=32,
    w_fmt="nvfp4",
    act_fmt="nvfp4",
    factor_dtype="bfloat16",
    residual_quant="gptq",
    mse_clip=True,
    refine_iters=3,
    sequential=True,
)
PRESETS = {
    "best-w4a4": _BEST_W4A4,
    # best-w4a4-lean: the same recipe at most 4.75 stored bits per weight. The smoothing is the
    # exportable one (one α-searched vector per input group folded into the norms and v/up rows,
    # methods/fold_smoothing.py), and the ranks (0, 4, … 24) come from the bit budget's knapsack
    # on ARHQ's tails, so that codes + scales + global scales + bf16 factors <= 4.75 bits/w. The
    # α search reads the first 4,096 calibration tokens (the search over all 16,384 dominated
    # the run). Measured on SmolLM2 at 16,384 tokens: 1.145x float perplexity at 4.750 bits/w
    # (docs/beyond_arhq.md).
    "best-w4a4-lean": {
        **_BEST_W4A4,
        "setting": "fold",
        "rank": 8,
        "bits_target": 4.75,
        "alpha_tokens": 4096,
    },
    # best-w4a16: weight-only serving (FP4 Marlin on Hopper/Ada reads no activation scale), at
    # most 4.75 bits/w. Every choice is made under the weight-only objective E‖x(W − Ŵ)ᵀ‖², i.e.
    # in the metric of H = XᵀX/N, not ARHQ's G: the ranks from the tails of W H½, GPTQ under H
    # with searched block scales, and the refinement's branch steps L = [(W − R) H̃½]_r H̃⁻½
    # (the weight-only moments of decomposition/refine.py).
    "best-w4a16": {
        **_BEST_W4A4,
        "method": "svdquant",
        "rank": 8,
        "bits_target": 4.75,
        "act_fmt": None,
    },
}


def preset(name: str, **overrides) -> QuantConfig:
    """The ``QuantConfig`` of a named recipe (``PRESETS``), with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; supported: {', '.join(PRESETS)}")
    return QuantConfig(**{**PRESETS[name], **overrides})


def _not_an_option(name: str, method: str) -> str:
    owners = REGISTRY.owners(name)
    if not owners:
        return f"unknown option {name!r} for {method}"
    return f"option {name} does not apply to {method} (it is an option of {', '.join(owners)})"


def _matches(pattern: str, name: str) -> bool:
    """A module pattern (shell-style, case-sensitive) against an HF prefix
    ``model.layers.3.mlp.down_proj``, with or without its leading ``model.``."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(
        name.removeprefix("model."), pattern
    )


def _ignore_patterns(ignore) -> tuple[str, ...]:
    if isinstance(ignore, str) or not isinstance(ignore, list | tuple):
        raise ValueError(f"ignore must be a list of module name patterns, got {ignore!r}")
    for i, p in enumerate(ignore):
        if not isinstance(p, str) or not p:
            raise ValueError(f"ignore[{i}] must be a non-empty string, got {p!r}")
    return tuple(ignore)


def _override_rules(overrides) -> tuple[tuple[str, str], ...]:
    """``[{"match": pattern, "format": fmt}, ...]`` (or ``(pattern, fmt)`` pairs) → pairs."""
    if isinstance(overrides, str) or not isinstance(overrides, list | tuple):
        raise ValueError(f"overrides must be a list of {{match, format}}, got {overrides!r}")
    out = []
    for i, o in enumerate(overrides):
        if isinstance(o, tuple) and len(o) == 2:
            o = {"match": o[0], "format": o[1]}
        if not isinstance(o, dict):
            raise ValueError(f"overrides[{i}] must be a mapping {{match, format}}, got {o!r}")
        extra = sorted(set(o) - set(OVERRIDE_KEYS))
        if extra:
            raise ValueError(
                f"overrides[{i}]: unknown key {extra[0]!r}; supported: {', '.join(OVERRIDE_KEYS)}"
            )
        for k in OVERRIDE_KEYS:
            if not isinstance(o.get(k), str) or not o[k]:
                raise ValueError(f"overrides[{i}].{k} must be a non-empty string, got {o.get(k)!r}")
        _one_of(f"overrides[{i}].format", o["format"], LINEAR_FORMATS)
        out.append((o["match"], o["format"]))
    return tuple(out)


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; supported: {', '.join(map(str, allowed))}")


def takes(method: str, **options) -> dict:
    """The subset of ``options`` that ``method`` has (for sweeps over methods, e.g. a rank
    given to rtn, svdquant and arhq alike): ``QuantConfig(method=m, **takes(m, rank=8))``."""
    known = option_fields(REGISTRY[method].Options)
    return {k: v for k, v in options.items() if k in known}
