"""Multi-device and multi-host placement through JAX's own machinery (jax.distributed, Mesh).

Data parallelism.  Every visible device (of every process) forms one 1-D mesh with the axis
"data".  The train state is replicated on it; each step's batch is sampled *inside* the jitted
step and constrained to be split along its leading (prompt) axis, so every device draws and
trains on its own slice of prompts, and XLA inserts the all-reduces for the mean loss and the
gradient.  Threefry is partitionable in JAX ≥ 0.5 (`jax_threefry_partitionable`), so the sharded
batch holds the same numbers as the unsharded one: a sharded run matches a single-device run up
to the summation order of the batch mean (float rounding), and resumes bit-identically on the
same number of devices.

Host CPUs.  XLA's CPU backend is one device, and it runs this model's small batched matmuls on
one core.  `config.cpu_devices = k` splits the host into k devices (`jax_num_cpu_devices`, which
must be set before JAX starts a backend: `maybe_initialize` does it first thing) so the batch is
spread over k cores by the same data-parallel path as on k GPUs.  (With the fused CPU kernel,
`model.kernel = "auto" | "cpu"`, one device already spreads the batch over every core, and is
faster: docs/scaling.md.  "auto" takes the XLA path whenever there are several devices.)

One program in flight.  XLA's in-process CPU collectives wait at most 60 s at an all-reduce
rendezvous and then abort the process.  When the host enqueues many sharded programs without
waiting, the devices' threads can end up blocked in the rendezvous of different programs and
never meet (seen with jax 0.10.2 on 2 host devices), so `block` waits for each chunk before the
next is dispatched — one wait per `train.steps_per_call` steps, which costs nothing measurable.

Single process, single device: everything here is the identity.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopicl.errors import ConfigError

DATA_AXIS = "data"

_initialized = False


class PlacementError(ConfigError):
  """The devices cannot hold the run as configured. Its message is one line naming the field."""


def _env_int(name: str):
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise PlacementError(f"{name}={value!r} is invalid; allowed: an integer >= 0") from None


def _backend_started() -> bool:
  from jax._src import xla_bridge  # the only way to ask without starting one
  return bool(getattr(xla_bridge, "_backends", {}))


def set_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` JAX devices (0: leave JAX's default); before any JAX work.

  Once a backend has started the device count is fixed: asking for the count it already has is
  fine, asking for another raises PlacementError (one line).
  """
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise PlacementError(f"config.cpu_devices={count!r} is invalid; allowed: an integer >= 0")
  if count == 0:
    return
  if _backend_started():
    have = len(jax.devices("cpu"))
    if have != count:
      raise PlacementError(
          f"config.cpu_devices={count} cannot take effect: JAX already started with {have} CPU "
          f"device(s) in this process; allowed: {have}, 0, or any count in a fresh process")
    return
  jax.config.update("jax_num_cpu_devices", count)


def maybe_initialize(config) -> None:
  """Prepares the devices once per process, before any other JAX call of the run.

  * `config.cpu_devices` > 0: split the host CPU into that many devices (see module docstring);
  * `config.distributed` or LOOPICL_DISTRIBUTED=1: `jax.distributed.initialize()`.  On a cluster
    (SLURM, Open MPI, TPU pods, …) JAX reads the coordinator address, the number of processes and
    this process's id from the environment; elsewhere set JAX_COORDINATOR_ADDRESS=host:port,
    LOOPICL_NUM_PROCESSES and LOOPICL_PROCESS_ID (docs/scaling.md).
  """
  global _initialized
  set_cpu_devices(int(config.cpu_devices))
  wanted = bool(config.distributed) or os.environ.get("LOOPICL_DISTRIBUTED") == "1"
  if wanted and not _initialized:
    jax.distributed.initialize(num_processes=_env_int("LOOPICL_NUM_PROCESSES"),
                               process_id=_env_int("LOOPICL_PROCESS_ID"))
    _initialized = True


# -- the mesh -------------------------------------------------------------------------------------

def data_mesh(batch_size: int | None = None) -> Mesh | None:
  """The 1-D "data" mesh over every device of every process; None with a single device.

  With `batch_size`, raises PlacementError unless it splits evenly over the devices: an uneven
  split would silently weight some prompts twice, or leave a device idle.
  """
  devices = jax.devices()
  if len(devices) == 1:
    return None
  if batch_size is not None and batch_size % len(devices):
    raise PlacementError(
        f"config.train.batch_size={batch_size} is invalid on {len(devices)} devices; allowed: a "
        f"multiple of {len(devices)} (or run on {math.gcd(batch_size, len(devices))} device(s))")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def split_batch(mesh: Mesh) -> NamedSharding:
  """Leading (prompt) axis split over the mesh, everything else whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def place_state(state, mesh: Mesh | None = None):
  """Puts the train state where the step runs: replicated on the mesh when there is one.

  Built from host values with `make_array_from_callback`, which is correct on one host and on
  many (each process supplies its own devices' copies, all of the same values).
  """
  mesh = data_mesh() if mesh is None else mesh
  if mesh is None:
    return state
  sharding = replicated(mesh)

  def place(leaf):
    host = np.asarray(host_value(leaf))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, state)


def constrain_batch(batch, mesh: Mesh | None, batch_size: int):
  """Inside jit: every leaf whose leading axis is the batch is split over the mesh."""
  if mesh is None:
    return batch
  sharding = split_batch(mesh)

  def constrain(leaf):
    if getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == batch_size:
      return jax.lax.with_sharding_constraint(leaf, sharding)
    return leaf

  return jax.tree.map(constrain, batch)


class ShardedFamily:
  """An objective whose `sample` returns a batch split over `mesh`; everything else delegated.

  `step.make_train_step` stays the plain single-device step: sharding is a property of where
  its batch lives, not of its code.
  """

  def __init__(self, family, mesh: Mesh):
    self._family, self._mesh = family, mesh

  def sample(self, key, batch_size: int):
    return constrain_batch(self._family.sample(key, batch_size), self._mesh, batch_size)

  def __getattr__(self, name):
    return getattr(self._family, name)


# -- host values ----------------------------------------------------------------------------------

def host_value(leaf):
  """A numpy copy of one array's global value, from any process.

  Replicated or process-local arrays are read directly; an array sharded across hosts is
  gathered (a collective: every process must call this for the same leaf).
  """
  if not isinstance(leaf, jax.Array):
    return np.asarray(leaf)
  if leaf.is_fully_addressable or leaf.is_fully_replicated:
    return np.asarray(jax.device_get(leaf))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def block(tree):
  """Waits until every array of `tree` is computed (keeps one sharded program in flight)."""
  return jax.block_until_ready(tree)
