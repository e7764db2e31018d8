"""Placement of a layer stage's per-projection work over several devices.

Calibration is data parallel (``arhq_jax.calibration.calibrate``: the batch is split over a ``data``
mesh). What follows the statistics — the eigh / Cholesky / SVD of every projection (or of one
shared G), GPTQ, the packing — is independent per projection, so ``Spread`` gives each
projection a device of its own (largest first, onto the least loaded device), and the method
dispatches them all before it waits on any: JAX dispatch is asynchronous, the devices work
concurrently. Every projection runs the very program it runs on one device, on a device of the
same kind, so the bits are those of one device (tests/parallel/test_devices.py).

The results are gathered back, replicated over the calibration mesh: the placement the one
device path gives them (its activation scales are already committed to that mesh), so that
downstream programs never see arrays committed to different devices. Under
``jax.distributed`` every process spreads over its own (addressable) devices and computes every
projection, so all processes hold the same quantized model (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def assign(costs: dict[Hashable, float], n_devices: int) -> dict[Hashable, int]:
    """Greedy longest-first assignment of work items to ``n_devices`` devices.

    ``costs``: {key: estimated cost}; returns {key: device index}. Deterministic (ties break by
    the keys' order in ``costs`` and by the lowest device index), so every process of a
    distributed run places the same way.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    load = [0.0] * n_devices
    out = {}
    for k in sorted(costs, key=lambda k: -costs[k]):  # a stable sort: ties keep their order
        d = min(range(n_devices), key=lambda j: (load[j], j))
        out[k] = d
        load[d] += float(costs[k])
    return out


def decomposition_cost(shape: tuple[int, int]) -> float:
    """The flop order of a dense factorization of a ``[out, in]`` weight: out·in·min(out, in)."""
    out_f, in_f = shape
    return float(out_f) * in_f * min(out_f, in_f)


def local_copy(x):
    """A single-device array holding the value of ``x`` when ``x`` spans other processes' devices
    (a fully replicated one reads its first local shard; a sharded one, e.g. over a ``model``
    axis, is all-gathered first, a collective every process runs in the same order); anything
    else is returned as is."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            x = _all_gather(x, NamedSharding(x.sharding.mesh, P()))
        return x.addressable_data(0)
    return x


@functools.partial(jax.jit, static_argnums=1)
def _all_gather(x, sharding):
    return jax.lax.with_sharding_constraint(x, sharding)


def replicated(x, sharding: NamedSharding):
    """``x`` (any placement, one value) as a replicated array on ``sharding``'s devices.

    Built from one copy per addressable device (``make_array_from_single_device_arrays``):
    unlike ``device_put`` this also holds under ``jax.distributed``, where the mesh spans
    devices of other processes (which hold the same value)."""
    if not isinstance(x, jax.Array):
        return x
    x = local_copy(x)
    copies = [jax.device_put(x, d) for d in sharding.addressable_devices]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, copies)


class Spread:
    """Where each projection of a stage runs, and the gather of its results.

    Args:
      devices: the devices to spread over (this process's own). One device (or none) and a
        home of this process only: every method keeps its one-device path unchanged
        (``active`` is False).
      home: the mesh the results are gathered to, replicated (default: one over ``devices``).
        A home spanning other processes keeps the work on this process's devices even with
        one of them (no cross-process program per projection).
    """

    def __init__(self, devices: Sequence | None = None, home: Mesh | None = None):
        self.devices = list(devices or [])
        if home is None and self.devices:
            home = Mesh(np.asarray(self.devices[:1]), ("data",))
        self.home = None if home is None else NamedSharding(home, P())
        pid = jax.process_index()
        remote = home is not None and any(d.process_index != pid for d in home.devices.flat)
        self.active = len(self.devices) > 1 or (remote and bool(self.devices))
        self._plan: dict = {}

    @classmethod
    def for_mesh(cls, mesh: Mesh, devices: Sequence | None = None) -> Spread:
        """Spread over ``devices`` (default: ``mesh``'s devices of this process), gathering to
        ``mesh``."""
        if devices is None:
            pid = jax.process_index()
            devices = [d for d in mesh.devices.flat if d.process_index == pid]
        return cls(devices, mesh)

    def plan(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """Assign the projections ``{proj: [out, in]}`` of one stage to devices; returns them in
        dispatch order, largest first (so that the first one of every device starts at once:
        a host-side check of a later one waits on its device's queue only)."""
        idx = assign({p: decomposition_cost(s) for p, s in shapes.items()}, len(self.devices))
        self._plan = {p: self.devices[i] for p, i in idx.items()}
        return list(idx)

    def device(self, proj: str):
        """The device of ``proj`` (``plan`` it first)."""
        return self._plan[proj]

    def put(self, tree, proj: str):
        """Every array of ``tree`` copied to ``proj``'s device (a global replicated array via
        its local copy); None leaves stay None."""
        dev = self.device(proj)
        return jax.tree.map(lambda x: jax.device_put(local_copy(x), dev), tree)

    def gather(self, tree):
        """Every array of ``tree`` replicated over the home mesh."""
        return jax.tree.map(lambda x: replicated(x, self.home), tree)


@dataclasses.dataclass(frozen=True)
class StagePlacement:
    """One stage's projections placed by a ``Spread``, or left where they are.

    ``order``: the projections in dispatch order. With an active spread each projection's inputs
    go to its own device (``put``) and ``gather`` brings the results back to the home mesh; with
    none (or one device) both are the identity and ``order`` is the given one.
    """

    spread: Spread | None
    order: list[str]

    @property
    def many(self) -> bool:
        return self.spread is not None

    def put(self, tree, proj: str):
        return self.spread.put(tree, proj) if self.many else tree

    def gather(self, tree):
        """``tree`` on the home mesh, once every array of it is computed."""
        return self.spread.gather(jax.block_until_ready(tree)) if self.many else tree

    def device_id(self, proj: str) -> int:
        return self.spread.device(proj).id


def stage_placement(spread: Spread | None, shapes: dict[str, tuple[int, int]]) -> StagePlacement:
    """Place the projections ``{proj: [out, in]}`` of one stage (``spread``: None or inactive
    keeps the one-device path)."""
    if spread is None or not spread.active:
        return StagePlacement(None, list(shapes))
    return StagePlacement(spread, spread.plan(shapes))
