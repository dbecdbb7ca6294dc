"""Device mesh and sharding: a 2-D (data, fsdp) mesh over every device of every host.

Batches are split over both axes. Parameters and optimiser state are split
over ``fsdp`` (fully-sharded data parallelism: each device holds 1/fsdp of the
state, XLA gathers weights where a layer needs them and reduce-scatters the
gradients) and replicated over ``data``. ``mesh.fsdp=1`` (the default) is
plain data parallelism with replicated state. `state_shardings` is the one
place that decides where every array of a train state lives; state creation,
the jitted step, checkpoint restore and sampling all use it. The same code
runs on one CPU, on fake CPU devices
(``--xla_force_host_platform_device_count=8``), on a GPU node and on several
hosts after ``jax.distributed.initialize``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common import config as config_lib
from common.errors import ConfigError

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # The batch is split over every device.


def get_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.fsdp = 1  # Devices that share one copy of the state (split over them); the other
              # factor of the device count is the data axis. 1 = replicated state.
  return c


def validate(c, prefix: str = 'mesh') -> None:
  config_lib.check_keys(c, get_config(), prefix)
  config_lib.check_positive(c.fsdp, f'{prefix}.fsdp')


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


def make_mesh(c=None, devices=None) -> Mesh:
  """The (data, fsdp) mesh over all (or the given) devices; `c` is a `mesh` config section
  (None: fsdp=1). fsdp is the inner axis, so its groups are neighbouring devices (one host
  or one NVLink island where the sizes allow)."""
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  fsdp = c.fsdp if c is not None else 1
  if devices.size % fsdp:
    raise ConfigError(f'mesh.fsdp={fsdp} does not divide the {devices.size} devices.')
  return Mesh(devices.reshape(-1, fsdp), BATCH_AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension over every device (both axes)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape, mesh: Mesh, how: str = 'fsdp', min_size: int = 0) -> P:
  """The partition of one array: its largest dimension divisible by the fsdp axis size is
  split over that axis ('fsdp'), unless the array has fewer than `min_size` elements or
  nothing divides; 'replicated' keeps it whole on every device. big_vision's `fsdp`."""
  n = mesh.shape[FSDP_AXIS]
  size = int(np.prod(shape)) if shape else 1
  if how == 'replicated' or n == 1 or size < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      return P(*([None] * dim + [FSDP_AXIS]))
  return P()


def state_shardings(abstract, mesh: Mesh, rules=None):
  """NamedShardings for every leaf of a train state (or any pytree of arrays/shape structs).

  `rules` (common.params.Rules) may pin parameters to 'replicated' by path and sets the
  size below which arrays stay whole; a leaf's path is matched by its last components,
  so a parameter, its EMA and its Adam moments (`opt_state/0/mu/<param path>`) lie alike.
  """
  from common import params as params_lib  # pylint: disable=g-import-not-at-top
  rules = rules if rules is not None else params_lib.Rules()
  min_size = rules.config.min_shard_size

  def one(path, leaf):
    how = 'fsdp'
    if rules.sharding:
      p = params_lib.path_str(path)
      suffixes = [p.split('/', i)[-1] for i in range(p.count('/') + 1)]
      how = next((v for _, regex, v, _ in rules.sharding
                  if any(regex.fullmatch(s) for s in suffixes)), 'fsdp')
    return NamedSharding(mesh, fsdp_spec(tuple(getattr(leaf, 'shape', ())), mesh, how, min_size))

  return jax.tree_util.tree_map_with_path(one, abstract)


def per_device_bytes(tree) -> int:
  """Bytes of `tree`'s arrays held by the first local device (from their addressable shards)."""
  device = jax.local_devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in getattr(x, 'addressable_shards', ()):
      if shard.device == device:
        total += shard.data.nbytes
  return total


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = 'batch_size') -> int:
  """Returns the per-process batch size, or a clear error if it does not divide."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ConfigError(
        f'{name}={global_batch_size} is not divisible by the {n} devices of the mesh.')
  return global_batch_size // jax.process_count()


def device_batch(batch_size: int, n: int, mesh: Mesh) -> int:
  """The batch of a sampling or encoding call over n items: min(batch_size, n) rounded up to
  a multiple of the mesh's devices, so every call has one compiled shape."""
  d = mesh.devices.size
  return -(-min(batch_size, n) // d) * d


def padded_batches(array: np.ndarray, batch_size: int, mesh: Mesh):
  """(start, batch placed over the mesh's devices, count of real rows) over `array` in
  batches of device_batch's size, the last one padded by repeating its last row (so the
  rows of each output [:count] are what the array's own rows give)."""
  batch = device_batch(batch_size, len(array), mesh)
  for start in range(0, len(array), batch):
    chunk = np.asarray(array[start:start + batch])
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
    yield start, jax.device_put(padded, data_sharding(mesh)), len(chunk)


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global sharded jax.Array.

  Each process passes its own slice of the global batch; on one host that is
  the whole batch.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: Mesh):
  """Places a pytree replicated on every device."""
  return jax.device_put(tree, replicated(mesh))


def place(tree, mesh: Mesh, rules=None):
  """Places a pytree (frozen weights: a VAE, LPIPS) by `state_shardings`: sharded over fsdp."""
  return jax.device_put(tree, state_shardings(tree, mesh, rules))


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
