"""Device mesh and sharding: data parallelism over every device of every host.

One mesh axis, ``data``. Batches are split along it; parameters and
optimiser state are replicated. The same code runs on one CPU, on fake CPU
devices (``--xla_force_host_platform_device_count=8``), on a GPU node and on
several hosts after ``jax.distributed.initialize``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.errors import ConfigError

DATA_AXIS = 'data'


def initialize_distributed() -> None:
  """Calls jax.distributed.initialize() when launched as a multi-process job.

  Explicit: JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (any launcher, also several processes on one machine).
  Detected by JAX itself: SLURM with more than one task, TPU pods. A plain
  single-process run does nothing here.
  """
  if jax.distributed.is_initialized():
    return
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address:
    jax.distributed.initialize(address, int(os.environ['JAX_NUM_PROCESSES']),
                               int(os.environ['JAX_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with the ``data`` axis over all (or the given) devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = 'batch_size') -> int:
  """Returns the per-process batch size, or a clear error if it does not divide."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ConfigError(
        f'{name}={global_batch_size} is not divisible by the {n} devices of the mesh.')
  return global_batch_size // jax.process_count()


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global sharded jax.Array.

  Each process passes its own slice of the global batch; on one host that is
  the whole batch.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: Mesh):
  """Places a pytree (params, train state) replicated on every device."""
  return jax.device_put(tree, replicated(mesh))


def barrier(name: str) -> None:
  """Waits for every process (no-op on one). Used after compilation, whose time varies
  between hosts, so the first collective does not time out (gloo's is 30 s)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def gather(x) -> np.ndarray:
  """A (possibly multi-host) sharded array -> full numpy array on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
