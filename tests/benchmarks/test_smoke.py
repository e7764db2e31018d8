"""Every benchmark script runs: each one in its ``--tiny`` mode on CPU, in a fresh subprocess.

A benchmark broken by a refactor, a renamed option or an installed package that its module names
shadow fails here instead of on the next person who runs it. ``SMOKE`` lists each script's
arguments (a script that writes results gets a temporary path); a new script in ``benchmarks/``
must be added to it (or to ``ELSEWHERE``, with the test that runs it), else the listing test
fails. The scripts are also checked not to shadow an installed package: no ``benchmarks/*.py``
stem is importable as a top-level module without ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

# script → its smoke arguments; "{tmp}" is replaced by a fresh temporary directory.
SMOKE = {
    "compare.py": ["--tiny", "--out", "{tmp}"],
    "decompose.py": ["--tiny"],
    "explore_w4a4.py": ["--tiny", "--out", "{tmp}/explore.jsonl"],
    "forward.py": ["--tiny"],
    "layer_profile.py": ["--tiny"],
    "pareto.py": ["--tiny", "--out", "{tmp}"],
    "pipeline.py": ["--tiny", "--json", "{tmp}/pipeline.json"],
    "recipe_digests.py": ["--tiny", "--only", "rtn", "--out", "{tmp}/digests.json"],
    "scale.py": ["--tiny", "--results", "{tmp}/scale.json"],
    "static_scales.py": ["--tiny", "--out", "{tmp}/static_scales.json"],
    "throughput.py": ["--tiny"],
}
# Scripts run elsewhere: the kernel benchmarks (their own tests, a GPU for the timings).
ELSEWHERE = {"fp4_kernels.py"}
# Modules that are not scripts (imported by the scripts, tested on their own).
MODULES = {"bench_tiny.py", "torch_reference.py"}


def _scripts() -> set[str]:
    return {p.name for p in BENCH.glob("*.py")}


def test_every_script_has_a_smoke_run():
    todo = {s for s in _scripts() - set(SMOKE) - ELSEWHERE - MODULES if not s.startswith("gpu_")}
    assert not todo, f"add a --tiny smoke run of {sorted(todo)} to SMOKE"
    assert set(SMOKE) <= _scripts(), f"SMOKE lists missing scripts: {set(SMOKE) - _scripts()}"


def test_no_benchmark_module_shadows_an_installed_package():
    """No stem of ``benchmarks/*.py`` is a top-level module of this environment (looked up in a
    fresh interpreter started in the repository root, ``benchmarks/`` not on its path)."""
    stems = sorted(p.stem for p in BENCH.glob("*.py"))
    code = (
        "import importlib.util, sys\n"
        f"for s in {stems!r}:\n"
        "    spec = importlib.util.find_spec(s)\n"
        "    if spec is not None: print(s, spec.origin)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", f"benchmarks/ modules shadow installed ones:\n{proc.stdout}"


def test_scripts_never_put_their_folder_first_on_sys_path():
    """Python puts a script's folder first on ``sys.path``; each script replaces it by the
    repository root before importing anything of the project."""
    for name in sorted(set(SMOKE)):
        src = (BENCH / name).read_text()
        assert 'sys.path.insert(0, str(ROOT / "benchmarks"))' not in src, name
        assert '!= ROOT / "benchmarks"]' in src, f"{name} keeps benchmarks/ on sys.path"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_in_tiny_mode(script, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in SMOKE[script]]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(ROOT),  # the subprocesses the scripts start (scale.py's CLI)
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{tail}"
    assert "Traceback" not in proc.stderr, tail
