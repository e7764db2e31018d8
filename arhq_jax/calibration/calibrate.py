"""Layer-by-layer calibration: run a model over calibration tokens and stream statistics.

The driver keeps the hidden states of every calibration sequence entering the current layer
(``[S, L, H]``, the only memory that grows with the number of tokens, as in GPTQ), re-runs one
layer at a time over batches of sequences, and feeds each projection's input to a streaming
accumulator (``arhq_jax.calibration.stats``), whose memory is O(D²) whatever the token count.
``Calibration`` is what a method sees of it (``stats``, ``alpha_search``, ``inputs``, the
lm_head input).

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

import arhq_jax.calibration.stats as stats
from arhq_jax.decomposition import decompose, refine, rotate
from arhq_jax.models import transformer
from arhq_jax.models.config import GROUP_OF, INPUT_GROUPS, Layer, ModelConfig, Params
from arhq_jax.numerics.formats import smooth_input
from arhq_jax.parallel.layer_sharding import data_size, place_layer


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


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cast(rows: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rows.astype(cfg.dtype)  # transformer.embed's cast, on rows gathered elsewhere


@functools.partial(jax.jit, static_argnames=("cfg", "capture"))
def layer_pass(layer: Layer, cfg: ModelConfig, h: jax.Array, capture: bool):
    """One decoder layer on calibration hidden states ``h [b, L, H]`` (jit-compiled): ``(h_out,
    captured)``, the inputs of every input group when ``capture`` (the runner's only layer run).
    The attention skips the causally masked key blocks (``transformer.CAUSAL_BLOCK``)."""
    b, t = h.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h_out, _, captured = transformer.layer_forward(
        layer, cfg, h, positions, capture=capture, causal_block=transformer.CAUSAL_BLOCK
    )
    return h_out, captured


# Captured layer inputs kept for a second pass (see ``LayerwiseRunner.captures``): SmolLM2 at
# 16,384 tokens needs 214 MB, Llama-3-8B at 16,384 tokens 1.8 GB; past the bound the layer runs
# again instead.
CAPTURE_CACHE_BYTES = 2 * 2**30


class LayerwiseRunner:
    """Hidden states of the calibration set, advanced one decoder layer at a time.

    Args:
      params, cfg: the (unquantized) model.
      ids: ``[S, L]`` int token ids, S sequences of equal length (no padding).
      batch_size: sequences per forward; rounded up to a multiple of the device count.
      mesh: shard batches over this mesh's ``data`` axis (default: all devices; None-equivalent
        on one device); a ``model`` axis shards the layer's float linears
        (``layer_sharding.model_mesh``).
    """

    def __init__(
        self,
        params: Params | None,
        cfg: ModelConfig,
        ids,
        batch_size: int = 8,
        mesh=None,
        *,
        embed_rows: Callable[[np.ndarray], np.ndarray] | None = None,
        hidden: list[np.ndarray] | None = None,
        capture_cache_bytes: int = CAPTURE_CACHE_BYTES,
        hidden_on_host: bool = False,
    ):
        """``embed_rows(ids [b, L]) -> [b, L, H]`` (``cfg.param_dtype``) replaces ``params``
        for the embedding (a lazy source gathers the rows from disk; the same bits as the
        in-memory ``take``); ``hidden`` restores the stored batches of ``hidden_states`` (a
        resumed run) instead of embedding ``ids``, which then only fix the batches' masks.
        ``capture_cache_bytes``: keep a layer's captured inputs for a second pass through the same
        layer object when all of them fit in this many bytes (0: never keep them).
        ``hidden_on_host``: keep the hidden states between layers in host memory, one batch on
        the device at a time (device memory: one layer + a batch; the same bits; no kept
        captures, so a second pass runs the layer again)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"calibration ids must be [sequences, length], got shape {ids.shape}")
        self.cfg = cfg
        self.mesh = data_mesh() if mesh is None else mesh
        ndev = data_size(self.mesh)
        self.batch_size = max(ndev, -(-batch_size // ndev) * ndev)
        self.num_tokens = int(ids.size)
        self._host = bool(hidden_on_host)
        self._batches = []  # list of (h [b, L, H] sharded or on the host, valid [b] sharded)
        # (layer, outputs) of the last fully consumed ``captures`` pass: ``advance`` through the
        # same layer object reuses them (parallel mode) instead of running the layer again.
        self._last = None
        # (layer, [(captured, mask)] per batch, outputs) of the last complete pass that fitted in
        # ``capture_cache_bytes``: a second ``captures`` of the same layer object (static
        # activation scales: the amax pass, then G) reads them instead of running the layer again.
        self._cache = None
        # On the host, nothing layer-sized stays on the device: no kept captures either.
        self._cache_bytes = 0 if self._host else int(capture_cache_bytes)
        if params is not None and embed_rows is None and hidden is None:
            params = replicate(params.replace(layers=()), self.mesh)  # the embedding is enough
        for k, start in enumerate(range(0, ids.shape[0], self.batch_size)):
            chunk, valid = pad_batch(ids[start : start + self.batch_size], ndev)
            if hidden is not None:
                h = shard_batch(hidden[k], self.mesh)
            elif embed_rows is not None:
                h = _cast(shard_batch(embed_rows(chunk), self.mesh), cfg)
            else:
                h = _embed(params, cfg, shard_batch(chunk, self.mesh))
            self._batches.append((self._store(h), shard_batch(valid, self.mesh)))
        if hidden is not None and len(hidden) != len(self._batches):
            n = len(self._batches)
            raise ValueError(f"{len(hidden)} stored hidden batches, the ids make {n}")

    def _store(self, h):
        """``h`` as kept between layers: a host array with ``hidden_on_host``, else as is."""
        return np.asarray(jax.device_get(h)) if self._host else h

    def on_device(self, h):
        """A stored batch on the devices (sharded over the batch) for a forward."""
        return shard_batch(h, self.mesh) if isinstance(h, np.ndarray) else h

    def hidden_states(self) -> list[np.ndarray]:
        """The stored hidden states, one host array ``[b, L, H]`` per batch (to resume)."""
        return [np.asarray(jax.device_get(h)) for h, _ in self._batches]

    def captures(self, layer: Layer) -> Iterator[tuple[dict[str, jax.Array], jax.Array]]:
        """Yield ``(captured, token_mask)`` per batch: the inputs of every input group of
        ``layer`` (``{"qkv": [b, L, H], "o": ..., "gate_up": ..., "down": [b, L, I]}``) and a
        ``[b, L]`` mask of real tokens.

        A second pass through the very same ``layer`` object yields the kept arrays of the
        first (the same program's outputs, so the same bits) when they fit in the runner's
        ``capture_cache_bytes``: one forward per layer per batch also when a method reads the
        inputs twice."""
        if self._cache is not None and self._cache[0] is layer:
            _, kept, outs = self._cache
            yield from kept
            self._last = (layer, outs)
            return
        self._last = self._cache = None
        placed = place_layer(layer, self.mesh)
        outs, kept = [], []
        for h, valid in self._batches:
            h_out, captured = layer_pass(placed, self.cfg, self.on_device(h), True)
            outs.append(self._store(h_out))
            mask = jnp.broadcast_to(valid[:, None], h.shape[:2])
            if kept is not None:
                nbytes = sum(x.nbytes for x in jax.tree.leaves(captured))
                kept = kept if nbytes * len(self._batches) <= self._cache_bytes else None
            if kept is not None:
                kept.append((captured, mask))
            yield captured, mask
        self._last = (layer, outs)
        if kept is not None:
            self._cache = (layer, kept, outs)

    def batches(self) -> list[tuple[jax.Array, jax.Array]]:
        """The stored ``(h [b, L, H], valid [b])`` batches entering the current layer (``h`` a
        host array with ``hidden_on_host``)."""
        return list(self._batches)

    def advance(self, layer: Layer) -> None:
        """Replace the stored hidden states by their output through ``layer``.

        Runs the same executable as ``captures`` (capture on), so reusing the outputs of the last
        complete capture pass through this very ``layer`` object gives the same bits."""
        last, self._last, self._cache = self._last, None, None
        if last is not None and last[0] is layer:
            self._batches = [(o, v) for o, (_, v) in zip(last[1], self._batches, strict=True)]
            return
        layer = place_layer(layer, self.mesh)
        self._batches = [
            (self._store(layer_pass(layer, self.cfg, self.on_device(h), True)[0]), v)
            for h, v in self._batches
        ]

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


def accumulate(
    runner: LayerwiseRunner,
    layer: Layer,
    specs: dict,
    scales: dict | None = None,
    tensor_scales: dict | None = None,
    rotate_block: int = 0,
):
    """Stream ``specs`` = {state name: StatsConfig} over the calibration batches → finalized stats.

    A name is ``group`` or ``group:proj``; when ``scales`` has an entry for the name, the input is
    smoothed first, as the runtime does it (``smooth_input``: x·fl32(1/s), G of the smoothed
    space); ``tensor_scales[name]`` fixes the nvfp4 activation scale of E = x − Q(x) (the static
    runtime quantizer; default dynamic over each batch); ``rotate_block`` > 0: statistics of the
    rotated input x R (``rotate.rotate``)."""
    scales = scales or {}
    tensor_scales = tensor_scales or {}
    shapes = runner.cfg.linear_shapes()
    init = {
        name: stats.init_stats(shapes[INPUT_GROUPS[name.split(":")[0]][0]][1], scfg)
        for name, scfg in specs.items()
    }

    def update(name, state, x, mask):
        if rotate_block:  # statistics of the rotated input x R
            x = rotate.rotate(x, rotate.block_for(x.shape[-1], rotate_block))
        s = scales.get(name)
        if s is not None:
            x = smooth_input(x, s)
        return stats.update_stats(
            state, x, specs[name], mask=mask, tensor_scale=tensor_scales.get(name)
        )

    return {k: stats.finalize(v) for k, v in runner.accumulate(layer, init, update).items()}


def alpha_search(runner, layer, projs, m_x, qcfg):
    """Per projection: the α* of the smoothing grid and its scale s ``[in]`` (docs/spec/methods.md
    §2.3).

    With static nvfp4 activation scales each candidate α quantizes x/s_α with the static scale
    of its amax over the calibration set (from ``m_x``), as the runtime will."""
    init = {f"{GROUP_OF[p]}:{p}": decompose.init_alpha_search() for p in projs}
    # search α on the first batches only (None: all)
    limit = getattr(qcfg, "alpha_tokens", None)

    def update(name, state, x, mask):
        if limit is not None and int(state.count) >= limit:
            return state
        p = name.split(":")[1]
        w = getattr(layer, p).w
        return decompose.update_alpha_search(
            state,
            x,
            w,
            m_x[GROUP_OF[p]],
            qcfg.w_spec,
            qcfg.act_spec,
            mask=mask,
            static_act_scale=qcfg.static_act_scale,
        )

    searched = runner.accumulate(layer, init, update)
    out = {}
    for name, state in searched.items():
        p = name.split(":")[1]
        alpha = decompose.select_alpha(state)
        w = getattr(layer, p).w
        s = decompose.smooth_scales(m_x[GROUP_OF[p]], decompose.weight_absmax(w), alpha)
        out[p] = (alpha, s.astype(jnp.float32))
    return out


class Calibration:
    """What a method may ask of the calibration data while it quantizes one layer.

    Wraps a ``LayerwiseRunner`` (None when the method needs no data and the mode is parallel:
    then no forward pass runs at all).
    """

    def __init__(self, runner: LayerwiseRunner | None, cfg: ModelConfig, plan=None, spread=None):
        self.runner = runner
        self.cfg = cfg
        # What the method's ``plan`` hook computed over the whole model (e.g. per-projection
        # ranks of the rank budget); None by default.
        self.plan = plan
        # the ``devices.Spread`` of the per-projection work (None: one device).
        self.spread = spread

    def _need(self) -> LayerwiseRunner:
        if self.runner is None:
            raise ValueError("this method declared that it needs no calibration data")
        return self.runner

    def stats(
        self,
        layer: Layer,
        specs: dict,
        scales: dict | None = None,
        tensor_scales: dict | None = None,
        rotate_block: int = 0,
    ) -> dict:
        """Finalized streaming statistics, see ``accumulate``."""
        return accumulate(self._need(), layer, specs, scales, tensor_scales, rotate_block)

    def moments(
        self, layer: Layer, groups, act_fmt, tensor_scales=None, rotate_block: int = 0
    ) -> dict:
        """``{group: {"H", "C", "G", ...}}``: the second moments of the joint refinement
        (``refine.accumulate_moments``)."""
        return refine.accumulate_moments(
            self._need(), layer, groups, act_fmt, tensor_scales, rotate_block
        )

    def alpha_search(self, layer: Layer, projs, m_x: dict, qcfg) -> dict:
        """Per projection ``(α*, s)`` of the smoothing grid (docs/spec/methods.md §2.3)."""
        return alpha_search(self._need(), layer, projs, m_x, qcfg)

    def inputs(self, layer: Layer, group: str, max_tokens: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of at most ``max_tokens`` real input tokens of ``group``:
        f32 ``[n, D]`` (for methods whose objective needs the tokens themselves, e.g. AWQ)."""
        runner = self._need()
        xs = []
        for captured, mask in runner.captures(layer):
            x = np.asarray(captured[group], np.float32)
            xs.append(x[np.asarray(mask)])
        return _subsample(np.concatenate(xs), max_tokens, seed)

    def _head_batches(self, final_norm):
        """The lm_head input, ``rms_norm(h, final_norm)`` of the hidden states after the layers
        the runner has been advanced through (all of them once the layer loop is done)."""
        runner = self._need()
        for h, valid in runner.batches():
            h = runner.on_device(h)
            x = transformer.rms_norm(h, final_norm, self.cfg.rms_norm_eps)
            yield x, jnp.broadcast_to(valid[:, None], h.shape[:2])

    def head_stats(self, final_norm, spec: stats.StatsConfig) -> dict:
        """Finalized statistics of the lm_head input (see ``_head_batches``)."""
        st = stats.init_stats(self.cfg.hidden_size, spec)
        for x, mask in self._head_batches(final_norm):
            st = stats.update_stats(st, x, spec, mask=mask)
        return stats.finalize(st)

    def head_inputs(self, final_norm, max_tokens: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of at most ``max_tokens`` lm_head input tokens (f32
        ``[n, H]``)."""
        xs = [np.asarray(x, np.float32)[np.asarray(m)] for x, m in self._head_batches(final_norm)]
        return _subsample(np.concatenate(xs), max_tokens, seed)


def _subsample(x: np.ndarray, max_tokens: int, seed: int) -> np.ndarray:
    if len(x) > max_tokens:
        idx = np.random.default_rng(seed).choice(len(x), max_tokens, replace=False)
        x = x[np.sort(idx)]
    return x
