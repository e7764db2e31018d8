"""Value parsers shared by the CLI flags and the method options (argparse ``type=`` callables).

Each raises ``argparse.ArgumentTypeError`` with a one-line reason, which argparse reports as
``argument --flag: ...``.
"""

from __future__ import annotations

import argparse
import math


def int_at_least(lo: int):
    """argparse ``type=``: an int ≥ ``lo``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """argparse ``type=``: a finite float in the interval [lo, hi] (open ends as given)."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        ok = (
            math.isfinite(v)
            and (v > lo if lo_open else v >= lo)
            and (v < hi if hi_open else v <= hi)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {s}")
        return v

    return parse


NONNEG = int_at_least(0)
POS = int_at_least(1)
