"""A decoder layer too large for one device: its float linears sharded over a ``model`` axis
for the calibration forwards.

The calibration mesh is 2-D, ``("data", "model")``: the batch is split over ``data`` (as with
the 1-D ``calibrate.data_mesh``) and every float ``Dense`` weight ``[out, in]`` of the layer
over ``model`` along its out features (its bias likewise), when ``out`` divides evenly;
norms, and linears that do not divide, are replicated. XLA's SPMD partitioner inserts the
collectives of the forward; an output feature is still one whole dot product on one device.

What is not sharded: the per-projection decomposition (one projection on one device,
``devices.Spread``) and the quantized layer, which is gathered replicated over the mesh
(docs/distributed.md).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arhq_jax.linears.base import Dense


def model_mesh(devices=None, model: int = 1) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: all) with ``model`` devices per
    layer shard group and the rest along ``data``."""
    devices = jax.devices() if devices is None else list(devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"the model axis ({model}) must divide the device count ({len(devices)})")
    return Mesh(np.asarray(devices).reshape(len(devices) // model, model), ("data", "model"))


def data_size(mesh: Mesh) -> int:
    """Devices along the batch axis (all of them for a 1-D ``data`` mesh)."""
    return mesh.shape["data"] if "data" in mesh.shape else mesh.devices.size


def layer_shardings(layer, mesh: Mesh):
    """The ``NamedSharding`` of every array of ``layer`` on ``mesh`` (a pytree like it)."""
    m = mesh.shape.get("model", 1)
    rep = NamedSharding(mesh, P())

    def of(node):
        if isinstance(node, Dense) and m > 1 and node.w.shape[0] % m == 0:
            return Dense(
                NamedSharding(mesh, P("model", None)),
                None if node.b is None else NamedSharding(mesh, P("model")),
            )
        return jax.tree.map(lambda _: rep, node)

    return jax.tree.map(of, layer, is_leaf=lambda n: isinstance(n, Dense))


def place_layer(layer, mesh: Mesh | None):
    """``layer`` on ``mesh``: float linears sharded over ``model``, the rest replicated."""
    if mesh is None:
        return layer
    return jax.device_put(layer, layer_shardings(layer, mesh))
