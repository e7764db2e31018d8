"""``QuantConfig``: what to quantize, how, and in which formats. Validated once, up front."""

from __future__ import annotations

import dataclasses

from arhq_jax.formats import resolve_format
from arhq_jax.models.config import INPUT_GROUPS, PROJECTIONS, ModelConfig

# Methods of the low-rank family (ARHQ and its references) handled by quantize_model directly.
LOWRANK_METHODS = ("rtn", "svdquant", "arhq")
METHODS = LOWRANK_METHODS
SETTINGS = ("raw", "smooth")
MODULES = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn": ("gate_proj", "up_proj", "down_proj"),
    "all": PROJECTIONS,
}
# Formats the packed QuantLinear runs (weights and activations).
LINEAR_FORMATS = ("nvfp4", "nvfp4-paper", "mxfp4", "int4", "int8", "int4-asym", "int8-asym")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One quantization recipe.

    Attributes:
      method: one of ``METHODS``.
      setting: ``raw`` or ``smooth`` (per-projection α-searched smoothing, methods.md §2.3).
      rank: rank r of the float low-rank branch (svdquant, arhq; ignored by rtn).
      w_fmt: weight format of the residual.
      act_fmt: runtime activation format, or None for weight-only.
      modules: ``attn``, ``ffn`` or ``all``.
      sequential: calibrate layer l on a model whose layers before l are already quantized.
      eps, rel_eps: ARHQ's eigenvalue clamp (absolute, and optional relative to λ_max).
      factor_dtype: storage dtype of A and B (None: the model's parameter dtype); the residual is
        recomputed from the cast factors so their rounding lands in the quantized residual.
      stats_dtype: accumulation dtype of calibration statistics (float32 or float64).
    """

    method: str = "arhq"
    setting: str = "raw"
    rank: int = 32
    w_fmt: str = "nvfp4"
    act_fmt: str | None = "nvfp4"
    modules: str = "all"
    sequential: bool = False
    eps: float = 1e-6
    rel_eps: float | None = None
    factor_dtype: str | None = None
    stats_dtype: str = "float32"

    def __post_init__(self):
        _one_of("method", self.method, METHODS)
        _one_of("setting", self.setting, SETTINGS)
        _one_of("modules", self.modules, tuple(MODULES))
        _one_of("weight format", self.w_fmt, LINEAR_FORMATS)
        if self.act_fmt is not None:
            _one_of("activation format", self.act_fmt, LINEAR_FORMATS)
            resolve_format(self.act_fmt)
        resolve_format(self.w_fmt)
        if self.method == "arhq" and self.act_fmt is None:
            raise ValueError(
                "arhq needs an activation format: G is built from the activation quantization "
                "residual, which is zero for weight-only quantization (use svdquant there)"
            )
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.stats_dtype not in ("float32", "float64"):
            raise ValueError(f"stats_dtype must be float32 or float64, got {self.stats_dtype!r}")

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
        """Reject a rank that does not fit some quantized projection of ``cfg``."""
        if not self.uses_branch:
            return
        for name, (out_f, in_f) in cfg.linear_shapes().items():
            if name in self.projections and self.rank > min(out_f, in_f):
                raise ValueError(
                    f"rank {self.rank} is too large for {name} of shape [{out_f}, {in_f}] "
                    f"(at most {min(out_f, in_f)})"
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
        rank = f"-r{self.rank}" if self.uses_branch else ""
        act = self.act_fmt or "w-only"
        return f"{self.method}{rank}-{self.setting}-{self.w_fmt}/{act}"


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; supported: {', '.join(map(str, allowed))}")
