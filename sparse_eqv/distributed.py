"""Several hosts: one process per host (or per accelerator) over `jax.distributed`.

Every process runs the same `finetune` on the same files. The device mesh
then spans the devices of all processes (`jax.devices()`); each process
builds every batch and places only its own shards (`jax.device_put` of the
global batch onto the global sharding), XLA averages the gradients across
hosts, and the replicated state is identical everywhere. Process 0 alone
writes the run directory; the others read it (checkpoints on resume, the
best model at the end), so RUN_DIR must sit on a file system all hosts share.
On one host none of this is needed: all local devices are used directly.
"""

from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the job: `jax.distributed.initialize` (arguments None = read from
    the cluster environment, e.g. SLURM or Open MPI). Call before any JAX
    computation. On CPU, collectives across processes go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """True in the process that writes files (process 0)."""
    return jax.process_index() == 0


def devices() -> list:
    """The devices a data-parallel mesh spans: all processes' when there are several."""
    return jax.devices() if jax.process_count() > 1 else jax.local_devices()


def barrier(name: str) -> None:
    """Wait until every process got here (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
