"""The ``Method`` protocol, the per-method options and the one registry of quantization methods.

A method is one object (see ``Method``): its ``name``, the ``formats`` it supports (with its
native defaults), an ``Options`` dataclass it owns (fields declared with ``option(...)``: the
default, the help text and the CLI flag are stated there once; ``arhq_jax.cli.main`` generates the
``quantize`` flags from them) and the pipeline hooks ``prepare`` / ``quantize_stage`` /
``finish`` that ``arhq_jax.run.quantize`` calls. ``QuantConfig`` routes the keyword options of
``QuantConfig(method=..., **options)`` into ``method.Options``; an option the method does not use
is an error naming both.

``arhq_jax.methods`` (the package) registers every method once, in ``REGISTRY``; a new method is
one file holding its ``Method`` subclass plus one line there (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from arhq_jax.methods.argtypes import POS, float_in

# Formats the packed QuantLinear runs (weights and activations).
LINEAR_FORMATS = ("nvfp4", "nvfp4-paper", "mxfp4", "int4", "int8", "int4-asym", "int8-asym")
ALL_ACTS = (*LINEAR_FORMATS, None)
SETTINGS = ("raw", "smooth", "fold")
RESIDUAL_QUANTS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class MethodFormats:
    """Supported formats of a method and its native defaults (None = weight-only)."""

    weights: tuple[str, ...]
    acts: tuple[str | None, ...]
    w_default: str
    act_default: str | None
    group_default: int | None = None  # int weight group (None: the format's default, 128)
    act_group_default: int | None = None  # int activation group (-1: per token)
    sequential_default: bool = False
    # Activation formats allowed with a given weight format (SERQ's paths), if restricted.
    paths: dict | None = None


def option(default: Any, help: str, **cli) -> Any:
    """A field of an ``Options`` dataclass: its default, its help text and the argparse keyword
    arguments of its ``quantize`` flag (``type``, ``choices``, ``action``; ``flag`` overrides the
    flag name, by default ``--`` + the field name with dashes)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


@dataclasses.dataclass(frozen=True)
class Options:
    """Options of a method (subclass it; every field an ``option``). Frozen and hashable, so a
    ``QuantConfig`` holding one stays a valid static jit argument."""

    def check(self, common) -> None:
        """Reject bad values (ValueError); ``common`` is the ``QuantConfig`` being built."""

    def unused(self, common) -> tuple[str, ...]:
        """Names of options that have no effect in this recipe (giving one is an error)."""
        return ()


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


class Method:
    """The protocol of a quantization method, with the defaults of its optional parts.

    Attributes (class level):
      name: the ``--method`` name.
      formats: ``MethodFormats``.
      Options: the options dataclass (``NoOptions`` by default).
      fused_w_scale: nvfp4 weights of the fused partitions q/k/v, gate/up can share one weight
        global scale (the method packs plain ``QuantLinear`` s).
      own_act_quantizer: the method brings its own activation quantizer (no act group size).
    """

    name: ClassVar[str] = ""
    formats: ClassVar[MethodFormats]
    Options: ClassVar[type[Options]] = NoOptions
    fused_w_scale: ClassVar[bool] = False
    own_act_quantizer: ClassVar[bool] = False

    def check(self, qcfg) -> None:
        """Cross-checks of the common fields and the options (ValueError)."""

    def check_model(self, qcfg, cfg) -> None:
        """Reject a recipe that does not fit ``cfg`` (e.g. a rank above a projection's size)."""

    def needs_calibration(self, qcfg) -> bool:
        """Whether the layer loop must run the model over calibration tokens (parallel mode)."""
        return True

    def prepare(self, params, cfg, calib_ids, qcfg):
        """Whole-model transforms before the layer loop (e.g. rotations); default: none."""
        return params

    def plan(self, params, cfg, calib_ids, qcfg, *, batch_size=8, mesh=None):
        """Whole-model decisions taken before the layer loop (e.g. the per-projection ranks of
        a rank budget), handed to ``quantize_stage`` as ``calib.plan``; default: None."""
        return None

    def transform_layer(self, layer, calib, qcfg):
        """A float-to-float transform of one decoder layer before its stages (e.g. folded
        smoothing) → ``(layer, {proj: extra diagnostics})``; default: none."""
        return layer, {}

    def quantize_stage(self, layer, groups, projs, calib, qcfg, layer_idx, timings):
        """Quantize ``projs`` (fed by input ``groups``) of ``layer`` → (layer, diagnostics).

        ``calib`` is an ``arhq_jax.calibration.calibrate.Calibration``; ``timings`` the mutable
        dict of
        ``calibration_s`` / ``decomposition_s`` / ``packing_s`` to add to."""
        raise NotImplementedError

    def finish(self, qparams, cfg, calib, qcfg):
        """After the layer loop (e.g. a quantized lm_head); default: nothing."""
        return qparams

    def streams(self, qcfg) -> bool:
        """Whether the recipe quantizes one layer at a time (``arhq_jax.run.stream``): no
        whole-model ``prepare`` or ``plan``. A method overriding either says when it is a
        no-op."""
        return type(self).prepare is Method.prepare and type(self).plan is Method.plan

    def finishes(self, qcfg) -> bool:
        """Whether ``finish`` changes anything for this recipe (the streaming quantizer then
        loads the embedding and lm_head for it)."""
        return type(self).finish is not Method.finish

    def label(self, qcfg) -> str:
        """The method part of ``QuantConfig.label()``."""
        return self.name

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def option_fields(options_cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(options_cls)}


class Registry:
    """Name → ``Method``, in registration order."""

    def __init__(self):
        self._methods: dict[str, Method] = {}

    def register(self, method: Method) -> Method:
        if not method.name or method.name in self._methods:
            raise ValueError(f"method name {method.name!r} is empty or already registered")
        self._methods[method.name] = method
        return method

    def unregister(self, name: str) -> Method:
        """Remove a method (tests that register a temporary one)."""
        return self._methods.pop(name)

    def __getitem__(self, name: str) -> Method:
        if name not in self._methods:
            raise ValueError(f"unknown method {name!r}; supported: {', '.join(self._methods)}")
        return self._methods[name]

    def __contains__(self, name) -> bool:
        return name in self._methods

    def __iter__(self):
        return iter(self._methods)

    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)

    def values(self):
        return self._methods.values()

    def owners(self, option_name: str) -> list[str]:
        """Names of the methods that have an option called ``option_name``."""
        return [n for n, m in self._methods.items() if option_name in option_fields(m.Options)]

    def all_options(self) -> dict[str, list[tuple[Method, dataclasses.Field]]]:
        """Option name → [(method, field)] over every registered method."""
        out: dict[str, list] = {}
        for m in self._methods.values():
            for f in dataclasses.fields(m.Options):
                out.setdefault(f.name, []).append((m, f))
        return out


REGISTRY = Registry()


@dataclasses.dataclass(frozen=True)
class GPTQCoreOptions(Options):
    """The options every GPTQ call takes (``--method gptq``, and the methods that quantize
    their weights with GPTQ: svdquant/arhq residuals, SERQ's int path, ResQ)."""

    percdamp: float = option(
        0.01, "GPTQ damping, a fraction of mean diag(H)", type=float_in(0, lo_open=True)
    )
    block_size: int = option(128, "GPTQ column block size", type=POS)

    def check(self, common) -> None:
        if not (isinstance(self.percdamp, int | float) and self.percdamp > 0):
            raise ValueError(f"percdamp must be > 0, got {self.percdamp}")
        if not (isinstance(self.block_size, int) and self.block_size > 0):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")


@dataclasses.dataclass(frozen=True)
class GPTQOptions(GPTQCoreOptions):
    """GPTQ's options (``--method gptq``, and the residual of svdquant/arhq)."""

    act_order: bool = option(
        False, "GPTQ act-order (static groups when grouped)", action="store_true"
    )
    mse_clip: bool = option(
        False,
        "MSE search of GPTQ's weight scales: QuaRot's range shrink (int formats), the E4M3 "
        "block-scale search of arhq_jax/decomposition/scale_search.py (nvfp4)",
        action="BooleanOptionalAction",
    )


GPTQ_CORE_OPTIONS = tuple(option_fields(GPTQCoreOptions))
GPTQ_OPTIONS = tuple(option_fields(GPTQOptions))


def check_rank(rank) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")


def check_residual_quant(name) -> None:
    if name not in RESIDUAL_QUANTS:
        raise ValueError(
            f"unknown residual quantizer {name!r}; supported: {', '.join(RESIDUAL_QUANTS)}"
        )
