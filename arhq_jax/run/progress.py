"""Progress of the layer loop in layers, with an ETA that leaves compilation out.

The first layer a run quantizes compiles every program the later layers reuse (on SmolLM2 it
took most of a minute where the others take seconds), so an ETA from it overestimates the run
many times over. ``LayerProgress`` counts layers ("layer 3/30"), shows no ETA until the first
layer is done, and then estimates from the layers after it only: remaining layers × the mean
time of the layers finished since the first.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def eta_seconds(ends: list[float], remaining: int) -> float | None:
    """The ETA from the end times of the layers finished this run (``ends``, seconds, in order)
    for ``remaining`` more layers: the mean time per layer after the first (compiling) one; None
    until two layers are done."""
    if len(ends) < 2:
        return None
    return (ends[-1] - ends[0]) / (len(ends) - 1) * remaining


def _clock(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class LayerProgress:
    """A tqdm-like progress bar (``update``, ``close``) over ``num_layers`` layers of
    ``stages`` stages each; ``update(1)`` is one stage (what ``quantize_layer`` calls).

    It shows ``layer n/N``, the stage within the layer being quantized and, from the second
    layer finished on, s/layer and an ETA that leave the first (compiling) layer out.
    """

    def __init__(
        self,
        num_layers: int,
        stages: int,
        *,
        initial: int = 0,
        desc: str = "quantize",
        disable: bool = False,
        clock=time.perf_counter,
    ):
        self.num_layers, self.stages, self.clock = num_layers, max(1, stages), clock
        self.first, self.done, self._stage, self.ends = initial, initial, 0, []
        self.bar = tqdm(
            total=num_layers,
            initial=initial,
            desc=desc,
            disable=disable,
            unit="layer",
            bar_format="{desc}: layer {n}/{total} |{bar}| {elapsed}{postfix}",
        )
        self._show()

    def eta(self) -> float | None:
        return eta_seconds(self.ends, self.num_layers - self.done)

    def status(self) -> str:
        """The text after the bar: the stage in progress and the ETA (or why there is none)."""
        parts = []
        if self.stages > 1 and self.done < self.num_layers:
            parts.append(f"stage {self._stage + 1}/{self.stages} of layer {self.done + 1}")
        eta = self.eta()
        if eta is None:
            parts.append(f"ETA after layer {self.first + 2} (layer {self.first + 1} compiles)")
        else:
            per = (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)
            parts.append(f"{per:.1f}s/layer, ETA {_clock(eta)} (compilation excluded)")
        return "; ".join(parts)

    def _show(self) -> None:
        self.bar.set_postfix_str(self.status(), refresh=False)
        self.bar.refresh()

    def update(self, n: int = 1) -> None:
        self._stage += n
        while self._stage >= self.stages:
            self._stage -= self.stages
            self.done += 1
            self.ends.append(self.clock())
            self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()
