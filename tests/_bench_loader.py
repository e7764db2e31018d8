"""Import a ``benchmarks/`` script by its file, under a private module name.

The tests never put ``benchmarks/`` on ``sys.path``: its module names (``scale``, ``compare``...)
would shadow any installed package of the same name for the rest of the test process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(stem: str):
    """The module ``benchmarks/<stem>.py`` as ``arhq_bench_<stem>`` (loaded once)."""
    name = f"arhq_bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
