"""``QuantConfig``: what to quantize, how, and in which formats. Validated once, up front.

Per method, ``METHOD_FORMATS`` lists the weight and activation formats it supports and its native
defaults; a field left at ``"default"`` (or None for the per-method options) takes the method's
default when the config is built, so ``QuantConfig(method="awq")`` is FPRAG's int4-asym g128
weight-only recipe and ``QuantConfig()`` is still ARHQ in NVFP4 W4A4 at rank 32.
"""

from __future__ import annotations

import dataclasses

from arhq_jax.formats import resolve_format
from arhq_jax.models.config import INPUT_GROUPS, PROJECTIONS, ModelConfig

# Methods of the low-rank family (ARHQ and its references) handled by quantize_model directly.
LOWRANK_METHODS = ("rtn", "svdquant", "arhq")
# The seed baselines, registered in arhq_jax.methods.LAYER_METHODS.
BASELINE_METHODS = ("gptq", "smoothquant", "awq", "awq-dh", "serq", "resq")
METHODS = LOWRANK_METHODS + BASELINE_METHODS
SETTINGS = ("raw", "smooth")
RESIDUAL_QUANTS = ("rtn", "gptq")
# nvfp4 activation tensor scale: calibrated once per linear input, or max|x| of each call.
ACT_SCALES = ("static", "dynamic")
# Methods whose projections are plain NVFP4 ``QuantLinear`` s, where q/k/v and gate/up are the
# fused partitions a serving engine stores with one weight global scale.
FUSED_SCALE_METHODS = ("rtn", "svdquant", "arhq", "gptq", "smoothquant")
MODULES = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn": ("gate_proj", "up_proj", "down_proj"),
    "all": PROJECTIONS,
}
# Formats the packed QuantLinear runs (weights and activations).
LINEAR_FORMATS = ("nvfp4", "nvfp4-paper", "mxfp4", "int4", "int8", "int4-asym", "int8-asym")
DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class MethodFormats:
    """Supported formats of a method and its native defaults (None = weight-only)."""

    weights: tuple[str, ...]
    acts: tuple[str | None, ...]
    w_default: str
    act_default: str | None
    group_default: int | None = None  # int weight group (None: the format's default, 128)
    act_group_default: int | None = None  # int activation group (-1: per token)
    rank_default: int = 32  # low-rank r, or SERQ's number of compensated channels
    residual_default: str = "rtn"
    sequential_default: bool = False
    # Activation formats allowed with a given weight format (SERQ's paths), if restricted.
    paths: dict | None = None


_ALL_ACTS = (*LINEAR_FORMATS, None)
METHOD_FORMATS = {
    "rtn": MethodFormats(LINEAR_FORMATS, _ALL_ACTS, "nvfp4", "nvfp4"),
    "svdquant": MethodFormats(LINEAR_FORMATS, _ALL_ACTS, "nvfp4", "nvfp4"),
    "arhq": MethodFormats(LINEAR_FORMATS, LINEAR_FORMATS, "nvfp4", "nvfp4"),
    # GPTQ: int4 sym per output channel, weight-only (group 128 with --group-size 128); also the
    # FP4 formats W4A4. Sequential calibration, as in the reference.
    "gptq": MethodFormats(
        LINEAR_FORMATS, _ALL_ACTS, "int4", None, group_default=-1, sequential_default=True
    ),
    # SmoothQuant: W8A8 int8 (per-channel weights, per-token activations), or any W4A4.
    "smoothquant": MethodFormats(
        ("int8", "int4", "nvfp4", "nvfp4-paper", "mxfp4"),
        ("int8", "int4", "nvfp4", "mxfp4"),
        "int8",
        "int8",
        group_default=-1,
        act_group_default=-1,
    ),
    # FPRAG-AWQ: int4 asymmetric [0, 15], group 128, weight-only; inputs from the partially
    # quantized model (sequential).
    "awq": MethodFormats(
        ("int4-asym",), (None,), "int4-asym", None, group_default=128, sequential_default=True
    ),
    "awq-dh": MethodFormats(
        ("int4-asym",), (None,), "int4-asym", None, group_default=128, sequential_default=True
    ),
    # SERQ: the MXFP4 path (C and main MXFP4, MXFP4 activations), the int path (C int4 per row,
    # main int4 g128, SERQ's asymmetric per-token g128 activations, 4 or 8 bits) and, as an
    # extension, an NVFP4 path built like the MXFP4 one.
    "serq": MethodFormats(
        ("mxfp4", "int4", "nvfp4"),
        ("mxfp4", "int4", "int8", "nvfp4", None),
        "mxfp4",
        "mxfp4",
        rank_default=128,
        paths={"mxfp4": ("mxfp4", None), "int4": ("int4", "int8", None), "nvfp4": ("nvfp4", None)},
    ),
    # ResQ: int4 with the top 1/8 of each input at int8 (weights per row, sym; activations per
    # token, asym), GPTQ with MSE clip.
    "resq": MethodFormats(
        ("int4",), ("int4", None), "int4", "int4", residual_default="gptq", sequential_default=True
    ),
}


def supported_formats(method: str) -> dict:
    """``{"weights": [...], "activations": [...]}`` of a method (None shown as "none")."""
    mf = METHOD_FORMATS[method]
    return {
        "weights": list(mf.weights),
        "activations": ["none" if a is None else a for a in mf.acts],
    }


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One quantization recipe.

    Attributes:
      method: one of ``METHODS``.
      setting: ``raw`` or ``smooth`` (per-projection α-searched smoothing, docs/spec/methods.md
      §2.3;
        low-rank methods only).
      rank: rank r of the float low-rank branch (svdquant, arhq; ignored by rtn), or SERQ's number
        of compensated salient channels; None: the method's default (32; SERQ 128).
      w_fmt: weight format of the residual; ``"default"``: the method's native one.
      act_fmt: runtime activation format, or None for weight-only; ``"default"``: native.
      modules: ``attn``, ``ffn`` or ``all``.
      sequential: calibrate layer l on a model whose layers before l are already quantized;
        None: the method's default (GPTQ, AWQ, ResQ: True; others False).
      eps, rel_eps: ARHQ's eigenvalue clamp (absolute, and optional relative to λ_max).
      factor_dtype: storage dtype of A and B (None: the model's parameter dtype); the residual is
        recomputed from the cast factors so their rounding lands in the quantized residual.
      stats_dtype: accumulation dtype of calibration statistics (float32 or float64).
      group_size: int weight group along ``in`` (-1: per output row); None: the method's default.
      act_group_size: int activation group along ``in`` (-1: per token) for the methods that run
        ``QuantLinear`` (rtn, svdquant, arhq, gptq, smoothquant); None: the method's default
        (SmoothQuant: per token; others the format's 128). SERQ and ResQ have their own.
      residual_quant: ``rtn`` or ``gptq`` for the residual of svdquant/arhq, SERQ's main weight
        (int path) and ResQ; None: the method's default (ResQ: gptq; others rtn).
      alpha: SmoothQuant's migration strength (None: 0.5).
      act_order, percdamp, block_size: GPTQ's options (act-order uses static groups).
      mse_clip: QuaRot's MSE clip of per-row int weight scales in GPTQ (None: on for ResQ only).
      quantize_lm_head: also quantize lm_head (None: FPRAG-AWQ yes, others no).
      seed: ResQ's random rotations.
      act_scale: nvfp4 activations only: ``"static"`` (default there: each quantized linear
        stores the global scale of its input amax measured on the calibration set, one per
        input group, so outputs never depend on batch composition) or ``"dynamic"`` (max|x| of
        every call, over the whole batch); None for recipes without nvfp4 activations (giving a
        value there is an error).
      fused_w_scale: nvfp4 weights only: one weight global scale shared by the fused partitions
        q/k/v and gate/up (computed jointly over the residuals that get quantized), as serving
        engines store them; None: on for rtn, svdquant, arhq, gptq and smoothquant with nvfp4
        weights, off otherwise. True where it does not apply is an error.
    """

    method: str = "arhq"
    setting: str = "raw"
    rank: int | None = None
    w_fmt: str = DEFAULT
    act_fmt: str | None = DEFAULT
    modules: str = "all"
    sequential: bool | None = None
    eps: float = 1e-6
    rel_eps: float | None = None
    factor_dtype: str | None = None
    stats_dtype: str = "float32"
    group_size: int | None = None
    act_group_size: int | None = None
    residual_quant: str | None = None
    alpha: float | None = None
    act_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    mse_clip: bool | None = None
    quantize_lm_head: bool | None = None
    seed: int = 0
    act_scale: str | None = None
    fused_w_scale: bool | None = None

    def __post_init__(self):
        _one_of("method", self.method, METHODS)
        mf = METHOD_FORMATS[self.method]
        _one_of("setting", self.setting, SETTINGS)
        _one_of("modules", self.modules, tuple(MODULES))
        # Per-method defaults (resolved here, so to_dict() records what actually ran).
        fill = {
            "w_fmt": mf.w_default if self.w_fmt == DEFAULT else self.w_fmt,
            "act_fmt": mf.act_default if self.act_fmt == DEFAULT else self.act_fmt,
            "rank": mf.rank_default if self.rank is None else self.rank,
            "sequential": mf.sequential_default if self.sequential is None else self.sequential,
            "residual_quant": self.residual_quant or mf.residual_default,
            "alpha": 0.5 if self.alpha is None else self.alpha,
            "mse_clip": (self.method == "resq") if self.mse_clip is None else self.mse_clip,
        }
        if self.quantize_lm_head is None:
            fill["quantize_lm_head"] = self.method in ("awq", "awq-dh")
        for k, v in fill.items():
            object.__setattr__(self, k, v)
        _one_of("weight format", self.w_fmt, LINEAR_FORMATS)
        if self.group_size is None and mf.group_default is not None:
            if resolve_format(self.w_fmt).is_int:
                object.__setattr__(self, "group_size", mf.group_default)
        if self.act_group_size is None and mf.act_group_default is not None:
            if self.act_fmt in LINEAR_FORMATS and resolve_format(self.act_fmt).is_int:
                object.__setattr__(self, "act_group_size", mf.act_group_default)
        if self.method == "arhq" and self.act_fmt is None:
            raise ValueError(
                "arhq needs an activation format: G is built from the activation quantization "
                "residual, which is zero for weight-only quantization (use svdquant there)"
            )
        self._check_formats(mf)
        self._resolve_scales()
        if self.setting == "smooth" and self.method not in LOWRANK_METHODS:
            raise ValueError(
                f"setting 'smooth' applies to {', '.join(LOWRANK_METHODS)} only; {self.method} "
                "has its own scaling"
            )
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.stats_dtype not in ("float32", "float64"):
            raise ValueError(f"stats_dtype must be float32 or float64, got {self.stats_dtype!r}")
        _one_of("residual quantizer", self.residual_quant, RESIDUAL_QUANTS)
        if self.residual_quant == "gptq" and self.method in ("rtn", "smoothquant", "awq", "awq-dh"):
            raise ValueError(
                f"--residual-quant gptq does not apply to {self.method} (use --method gptq); it "
                "is for svdquant, arhq, serq (int path) and resq"
            )
        if self.method == "serq" and self.residual_quant == "gptq" and self.w_fmt != "int4":
            raise ValueError("SERQ uses GPTQ on the int path only (weight format int4)")
        if self.quantize_lm_head and self.method not in ("awq", "awq-dh"):
            raise ValueError(
                f"quantizing lm_head is supported by awq and awq-dh, not {self.method}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {self.percdamp}")
        if not (isinstance(self.block_size, int) and self.block_size > 0):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    def _check_formats(self, mf: MethodFormats) -> None:
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
            if self.method in ("serq", "resq", "awq", "awq-dh"):
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

    def _resolve_scales(self) -> None:
        if self.act_fmt is not None and resolve_format(self.act_fmt).name == "nvfp4":
            if self.act_scale is None:
                object.__setattr__(self, "act_scale", "static")
            _one_of("activation scale", self.act_scale, ACT_SCALES)
        elif self.act_scale is not None:
            what = "weight-only" if self.act_fmt is None else f"activations in {self.act_fmt}"
            raise ValueError(f"act_scale applies to nvfp4 activations only; this recipe is {what}")
        applies = resolve_format(self.w_fmt).name == "nvfp4" and self.method in FUSED_SCALE_METHODS
        if self.fused_w_scale is None:
            object.__setattr__(self, "fused_w_scale", applies)
        elif not isinstance(self.fused_w_scale, bool):
            raise ValueError(f"fused_w_scale must be True or False, got {self.fused_w_scale!r}")
        elif self.fused_w_scale and not applies:
            raise ValueError(
                "fused_w_scale applies to nvfp4 weights of "
                f"{', '.join(FUSED_SCALE_METHODS)}; not to {self.method} with {self.w_fmt} weights"
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
        return self.method in ("svdquant", "arhq") and self.rank > 0

    def check_model(self, cfg: ModelConfig) -> None:
        """Reject a rank (or SERQ r) that does not fit some quantized projection of ``cfg``."""
        for name, (out_f, in_f) in cfg.linear_shapes().items():
            if name not in self.projections:
                continue
            if self.uses_branch and self.rank > min(out_f, in_f):
                raise ValueError(
                    f"rank {self.rank} is too large for {name} of shape [{out_f}, {in_f}] "
                    f"(at most {min(out_f, in_f)})"
                )
            if self.method == "serq" and self.rank > in_f:
                raise ValueError(
                    f"SERQ r={self.rank} compensated channels exceed {name}'s {in_f} inputs"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
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
        setting = f"-{self.setting}" if self.method in LOWRANK_METHODS else ""
        return f"{self.method}{rank}{res}{setting}-{w}/{act}"


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; supported: {', '.join(map(str, allowed))}")
