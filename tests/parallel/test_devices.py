"""Many devices: per-projection decompositions spread over fake CPU devices, and two
``jax.distributed`` processes on one machine, against the one-device result.

Fake devices need ``--xla_force_host_platform_device_count`` before jax is imported, so the
multi-device runs are subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _tiny import CFG
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arhq_jax.calibration.calibrate import data_mesh
from arhq_jax.models.params import random_params
from arhq_jax.parallel.devices import Spread, assign
from arhq_jax.run.config import QuantConfig
from arhq_jax.run.quantize import quantize_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The subprocesses import this checkout (not whatever an editable install points at).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}

PRELUDE = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={n}"
    import jax, numpy as np
    sys.path.insert(0, "tests")
    import _tiny as T
    from arhq_jax.calibration.calibrate import data_mesh
    from arhq_jax.models.params import random_params
    from arhq_jax.run.config import QuantConfig
    from arhq_jax.run.quantize import quantize_model
    from arhq_jax.parallel import distributed
    if len(sys.argv) > 1:  # a jax.distributed process: join before any JAX computation
        distributed.initialize(f"localhost:{{sys.argv[2]}}", 2, int(sys.argv[1]))
    params = random_params(T.CFG, jax.random.key(0), std=0.08)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, T.CFG.vocab_size), np.int32)
    """
)

SPREAD = PRELUDE.format(n=4) + textwrap.dedent(
    """
    assert len(jax.devices()) == 4
    one = data_mesh(jax.devices()[:1])  # the same statistics for both runs: only placement varies
    out = {}
    for kw in ({"method": "arhq", "rank": 8}, {"method": "gptq"}):  # rtn: in the two processes
        q = QuantConfig(**kw)
        a = quantize_model(params, T.CFG, ids, q, batch_size=6, mesh=one,
                           devices=jax.devices()[:1], progress=False)
        b = quantize_model(params, T.CFG, ids, q, batch_size=6, mesh=one,
                           devices=jax.devices(), progress=False)
        la, lb = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
        out[kw["method"]] = {
            "leaves": len(la),
            "differ": [i for i, (x, y) in enumerate(zip(la, lb, strict=True))
                       if x.dtype != y.dtype or not np.array_equal(np.asarray(x), np.asarray(y))],
            "devices": sorted({d["device"] for d in b.projections}),
            "one_device": [d.get("device") for d in a.projections],
            "placed": sorted({str(x.sharding.device_set) for x in lb}),
        }
    # A layer sharded over a model axis of 2 (and the batch over data = 2): its calibration
    # inputs against one device's.
    from arhq_jax.calibration.calibrate import LayerwiseRunner
    from arhq_jax.parallel.layer_sharding import model_mesh, place_layer
    mm = model_mesh(model=2)
    shard = place_layer(params.layers[1], mm).gate_proj.w.addressable_shards[0].data.shape
    caps = {}
    for name, mesh in (("one", one), ("model", mm)):
        r = LayerwiseRunner(params, T.CFG, ids, batch_size=6, mesh=mesh)
        r.advance(params.layers[0])
        caps[name] = {k: np.asarray(v).tolist() for c, _ in r.captures(params.layers[1])
                      for k, v in c.items()}
    out["model_axis"] = {"shard": shard, "mesh": dict(mm.shape), "caps": caps}
    print(json.dumps(out))
    """
)


def test_assign_is_longest_first_onto_the_least_loaded():
    costs = {"q": 4.0, "k": 1.0, "v": 1.0, "gate": 12.0, "up": 12.0, "down": 12.0}
    assert assign(costs, 4) == {"gate": 0, "up": 1, "down": 2, "q": 3, "k": 3, "v": 3}
    assert assign(costs, 2) == {"gate": 0, "up": 1, "down": 0, "q": 1, "k": 1, "v": 1}
    assert set(assign(costs, 1).values()) == {0}
    with pytest.raises(ValueError, match="n_devices"):
        assign(costs, 0)


def test_spread_plans_largest_first_and_gathers_to_its_home():
    d = jax.devices()[0]
    home = data_mesh([d])
    assert not Spread([d], home).active  # one device: the methods' unchanged path
    sp = Spread([d, d], home)  # two slots (on one device here): the spread path
    assert sp.active
    assert sp.plan({"q": (64, 64), "gate": (96, 64), "k": (32, 64)}) == ["gate", "q", "k"]
    x = sp.put({"a": np.arange(3.0, dtype=np.float32), "b": None}, "q")
    assert x["b"] is None and x["a"].devices() == {d} and x["a"].committed
    g = sp.gather(x)
    assert g["a"].sharding == NamedSharding(home, P())
    np.testing.assert_array_equal(np.asarray(g["a"]), [0.0, 1.0, 2.0])
    assert not Spread().active  # no devices: nothing to spread over


def test_spread_decompositions_and_a_model_axis_equal_one_device():
    """ARHQ and GPTQ with their per-projection work on 4 devices: every array of the quantized
    model equals the one-device run's, and the work landed on several devices (RTN's packing
    is spread in ``test_two_processes_equal_one``). A layer sharded over a ``model`` axis gives
    the calibration inputs of one device to f32 rounding."""
    proc = subprocess.run(
        [sys.executable, "-c", SPREAD], capture_output=True, text=True, cwd=ROOT, env=ENV,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    model = out.pop("model_axis")
    assert model["mesh"] == {"data": 2, "model": 2}
    assert model["shard"] == [CFG.intermediate_size // 2, CFG.hidden_size]  # half of gate_proj
    for k, ref in model["caps"]["one"].items():  # equal to f32 rounding (XLA's partitioning)
        np.testing.assert_allclose(model["caps"]["model"][k], ref, rtol=1e-5, atol=1e-5)
    for method, r in out.items():
        assert r["leaves"] > 0 and r["differ"] == [], method
        assert len(r["devices"]) >= 3, (method, r["devices"])  # gptq: 3 per sequential stage
        assert set(r["one_device"]) == {None}  # one device: the unchanged path
        assert r["placed"] == ["{CpuDevice(id=0)}"]  # gathered back to the calibration mesh


DIST = PRELUDE.format(n=2) + textwrap.dedent(
    """
    pid, out = int(sys.argv[1]), sys.argv[3]

    def _bytes(x):  # npz keeps no fp8 dtypes: compare the raw bytes, with the dtype's name
        x = np.ascontiguousarray(np.asarray(x))
        return np.frombuffer(x.dtype.name.encode() + x.tobytes(), np.uint8)
    res = {"describe": distributed.describe(), "writer": distributed.is_writer()}
    arrays = {}
    for kw in ({"method": "rtn"}, {"method": "arhq", "rank": 8}):
        r = quantize_model(params, T.CFG, ids, QuantConfig(**kw), batch_size=6, progress=False)
        for i, x in enumerate(jax.tree.leaves(r.params)):
            arrays[f"{kw['method']}/{i}"] = _bytes(x)
        res[kw["method"]] = [(d.get("objective"), d["w_quant_rel_err"]) for d in r.projections]
    np.savez(f"{out}.{pid}.npz", **arrays)
    print(json.dumps(res))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """Two ``jax.distributed`` CPU processes of 2 devices each (a 4-device calibration mesh over
    both): both hold the same quantized model; RTN equals one device bit for bit (its statistics
    are maxima), ARHQ to f32 summation order (G is a sum, all-reduced across processes)."""
    port, out = str(_free_port()), str(tmp_path / "q")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DIST, str(i), port, out],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    res = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        res.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["writer"] for r in res] == [True, False]
    assert res[0]["describe"] == "process 0 of 2, 2 of 4 cpu devices"
    a, b = np.load(f"{out}.0.npz"), np.load(f"{out}.1.npz")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    params = random_params(CFG, jax.random.key(0), std=0.08)
    ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 32), 0, CFG.vocab_size), np.int32)
    one = dict(batch_size=6, mesh=data_mesh(jax.devices()[:1]), devices=jax.devices()[:1])
    rtn = quantize_model(params, CFG, ids, QuantConfig(method="rtn"), progress=False, **one)
    leaves = jax.tree.leaves(rtn.params)
    assert len(leaves) == sum(k.startswith("rtn/") for k in a)
    for i, x in enumerate(leaves):
        x = np.ascontiguousarray(np.asarray(x))
        assert a[f"rtn/{i}"].tobytes() == x.dtype.name.encode() + x.tobytes(), i
    arhq = quantize_model(
        params, CFG, ids, QuantConfig(method="arhq", rank=8), progress=False, **one
    )
    ref = [(d["objective"], d["w_quant_rel_err"]) for d in arhq.projections]
    np.testing.assert_allclose(np.asarray(res[0]["arhq"]), np.asarray(ref), rtol=1e-4)


def test_distributed_flags_are_checked_first(tmp_path, capsys):
    """The jax.distributed flags go together and are checked before anything is loaded."""
    from arhq_jax.cli.main import main

    base = ["quantize", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "q")]
    assert main([*base, "--num-processes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "arhq-jax quantize: error: --coordinator, --num-processes and --process-id go together"
    )
    assert main([*base, "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id must be in [0, --num-processes = 2), got 2" in capsys.readouterr().err
    assert (
        main([*base, "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"]) == 2
    )
    assert "--coordinator must be HOST:PORT" in capsys.readouterr().err
    assert main([*base, "--model-shards", "3"]) == 2  # one CPU device here, or more: 3 ∤ 2, 4
    assert "the model axis (3) must divide the device count" in capsys.readouterr().err
