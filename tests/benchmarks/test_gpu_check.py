"""benchmarks/gpu_check.py --cpu-smoke: the GPU check script runs end to end on CPU (interpret
mode, tiny shapes), so that the run on a lent GPU does not fail on a typo."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "smoke.json"
    assert mod.main(["--cpu-smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["versions"]["mode"].startswith("cpu-smoke")
    tests = data["sections"]["tests"]
    assert tests and all(r["ok"] for r in tests)
    assert any(r["case"].startswith("kernel1-packed") for r in tests)
    assert {r["what"] for r in data["sections"]["limits"]} == {"copy x+1", "bf16 dot 128^3"}
    rows = data["sections"]["projections"]
    assert {(r["fmt"], r["mode"]) for r in rows} == {
        (f, m) for f in ("nvfp4", "mxfp4") for m in ("w4a4", "w4a16")
    }
    for r in rows:  # the kernel equals the jnp path; CPU times are wall clock and say so
        assert "error" not in r and r["rel_err_vs_jnp"] <= 1e-2
        assert r["pallas"]["device_us"] is None and r["pallas"]["wall_us"] > 0
