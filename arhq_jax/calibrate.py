"""Layer-by-layer calibration: run a model over calibration tokens and stream statistics.

The driver keeps the hidden states of every calibration sequence entering the current layer
(``[S, L, H]``, the only memory that grows with the number of tokens, as in GPTQ), re-runs one
layer at a time over batches of sequences, and feeds each projection's input to a streaming
accumulator (``arhq_jax.stats``), whose memory is O(D²) whatever the token count.

q/k/v read one input and gate/up read one input, so their statistics are accumulated once per
input group (``INPUT_GROUPS``). The batch dimension is sharded over every visible device
(``jax.sharding.Mesh`` with one ``data`` axis); statistics are sums, so XLA's reduction over the
sharded batch gives the single-device result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arhq_jax.models import transformer
from arhq_jax.models.config import Layer, ModelConfig, Params


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all visible devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad the leading axis of ``x`` to a multiple of ``multiple`` with copies of row 0.

    Returns the padded array and a boolean ``[B_pad]`` mask of real rows: padded rows keep the
    shapes static and the batch divisible by the device count, and the mask keeps them out of
    every statistic.
    """
    b = x.shape[0]
    pad = (-b) % multiple
    valid = np.concatenate([np.ones(b, bool), np.zeros(pad, bool)])
    if pad:
        x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)], axis=0)
    return x, valid


def shard_batch(x, mesh: Mesh | None):
    """Place ``x`` with its leading (batch) axis split over the mesh's ``data`` axis."""
    if mesh is None:
        return jnp.asarray(x)
    spec = P("data", *([None] * (np.ndim(x) - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))


def replicate(tree, mesh: Mesh | None):
    """Place every array of ``tree`` on all devices of ``mesh`` (parameters of a sharded batch)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed(params: Params, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    return transformer.embed(params, cfg, ids)


@functools.partial(jax.jit, static_argnames=("cfg", "capture"))
def _layer(layer: Layer, cfg: ModelConfig, h: jax.Array, capture: bool):
    b, t = h.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h_out, _, captured = transformer.layer_forward(layer, cfg, h, positions, capture=capture)
    return h_out, captured


class LayerwiseRunner:
    """Hidden states of the calibration set, advanced one decoder layer at a time.

    Args:
      params, cfg: the (unquantized) model.
      ids: ``[S, L]`` int token ids, S sequences of equal length (no padding).
      batch_size: sequences per forward; rounded up to a multiple of the device count.
      mesh: shard batches over this mesh (default: all devices; None-equivalent on one device).
    """

    def __init__(self, params: Params, cfg: ModelConfig, ids, batch_size: int = 8, mesh=None):
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"calibration ids must be [sequences, length], got shape {ids.shape}")
        self.cfg = cfg
        self.mesh = data_mesh() if mesh is None else mesh
        ndev = self.mesh.devices.size
        self.batch_size = max(ndev, -(-batch_size // ndev) * ndev)
        self.num_tokens = int(ids.size)
        self._batches = []  # list of (h [b, L, H] sharded, valid [b] sharded)
        # (layer, outputs) of the last fully consumed ``captures`` pass: ``advance`` through the
        # same layer object reuses them (parallel mode) instead of running the layer again.
        self._last = None
        params = replicate(params, self.mesh)
        for start in range(0, ids.shape[0], self.batch_size):
            chunk, valid = pad_batch(ids[start : start + self.batch_size], ndev)
            h = _embed(params, cfg, shard_batch(chunk, self.mesh))
            self._batches.append((h, shard_batch(valid, self.mesh)))

    def captures(self, layer: Layer) -> Iterator[tuple[dict[str, jax.Array], jax.Array]]:
        """Yield ``(captured, token_mask)`` per batch: the inputs of every input group of
        ``layer`` (``{"qkv": [b, L, H], "o": ..., "gate_up": ..., "down": [b, L, I]}``) and a
        ``[b, L]`` mask of real tokens."""
        self._last = None
        placed = replicate(layer, self.mesh)
        outs = []
        for h, valid in self._batches:
            h_out, captured = _layer(placed, self.cfg, h, True)
            outs.append(h_out)
            mask = jnp.broadcast_to(valid[:, None], h.shape[:2])
            yield captured, mask
        self._last = (layer, outs)

    def advance(self, layer: Layer) -> None:
        """Replace the stored hidden states by their output through ``layer``.

        Runs the same executable as ``captures`` (capture on), so reusing the outputs of the last
        complete capture pass through this very ``layer`` object gives the same bits."""
        last, self._last = self._last, None
        if last is not None and last[0] is layer:
            self._batches = [(o, v) for o, (_, v) in zip(last[1], self._batches, strict=True)]
            return
        layer = replicate(layer, self.mesh)
        self._batches = [(_layer(layer, self.cfg, h, True)[0], v) for h, v in self._batches]

    def accumulate(
        self,
        layer: Layer,
        init: dict[str, object],
        update: Callable[[str, object, jax.Array, jax.Array], object],
    ) -> dict[str, object]:
        """Fold ``update(name, state, x, mask)`` over every batch for each named state.

        ``init`` maps a state name to its initial state; the name's group is the part before
        ``:`` (``"qkv"``, or ``"qkv:q_proj"`` for per-projection states such as smoothed G).
        """
        states = dict(init)
        for captured, mask in self.captures(layer):
            for name, state in states.items():
                states[name] = update(name, state, captured[name.split(":")[0]], mask)
        return states
