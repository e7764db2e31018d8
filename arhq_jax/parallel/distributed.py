"""Several processes, one per host, through JAX's multi-controller runtime (docs/distributed.md).

Every process runs the same program on the same inputs (model, calibration ids, recipe);
``jax.distributed.initialize`` makes ``jax.devices()`` the devices of all of them, so the
calibration mesh (``calibrate.data_mesh``) spans every host and each process feeds its own
devices' share of the batch. The per-projection decompositions run on each process's own devices
(``devices.Spread``), so every process ends with the same quantized model; process 0 alone
writes files (``is_writer``).
"""

from __future__ import annotations

import jax


def check_args(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Validate the launch arguments (ValueError, one line); all None: a single process."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (process 0's host), got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id must be in [0, --num-processes = {num_processes}), got {process_id}"
        )


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Join the run of ``num_processes`` processes coordinated at ``coordinator`` (HOST:PORT of
    process 0) as ``process_id``; nothing when all three are None. Must come before any JAX
    computation. On CPU the cross-process collectives are gloo's."""
    check_args(coordinator, num_processes, process_id)
    if coordinator is None:
        return
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def is_writer() -> bool:
    """Whether this process writes the outputs (checkpoints, reports): process 0."""
    return jax.process_index() == 0


def describe() -> str:
    """``process i of n, k of N devices`` (for logs)."""
    return (
        f"process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} {jax.default_backend()} devices"
    )
