"""The training step and the jitted chunk of steps, for K ≥ 1 seeds at once.

`make_train_step` is the pure (state, step) -> (state, metrics) of one seed: state =
{"params", "opt_state", "data_key"}, and step s draws its batch from fold_in(data_key, s) on
device, so the data is a function of the step alone.  Everything that differs between two seeds
lives in that state, so `jax.vmap` over a stack of K states is K independent runs in one program
(one compile, one dispatch per chunk); a single run is K = 1 of it.  `make_chunk` builds that
program; `compile_ahead` compiles every program a chunk plan needs on worker threads.

Placement: several seeds on several devices split the seed axis over a 1-D "seeds" mesh (no
operation mixes the lanes: no collectives); one seed on several devices (host CPU devices from
`cpu_devices`, GPUs, hosts) splits its batch over a "data" mesh with the state replicated
(distributed.py).  Each seed is initialised from its own seed s: parameters from
fold_in(key(s), 0), data key fold_in(key(s), 1).
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopicl import distributed, optim


class ModelDef(NamedTuple):
  """What turns trainable parameters back into the model: the graph and the frozen variables."""
  graphdef: object
  frozen: nnx.State

  def merge(self, params):
    return nnx.merge(self.graphdef, params, self.frozen)


def init_state(family, tx, seed: int):
  """(model_def, state) of seed `seed`: parameters from fold_in(key(seed), 0), data key
  fold_in(key(seed), 1).  Only the family's trainable variables are in the state; the others
  (e.g. a fixed output layer) are constants of the step, rebuilt from the seed, never trained."""
  key = jax.random.key(int(seed))
  model = family.create_model(nnx.Rngs(params=jax.random.fold_in(key, 0)))
  graphdef, trainable, frozen = nnx.split(model, family.trainable, ...)
  params = nnx.to_pure_dict(trainable)
  state = {"params": params, "opt_state": tx.init(params),
           "data_key": jax.random.key_data(jax.random.fold_in(key, 1))}
  return ModelDef(graphdef, frozen), state


def init_states(family, tx, seeds):
  """(model_def, states): the initial states of `seeds`, every leaf stacked [K, ...]."""
  built = [init_state(family, tx, int(s)) for s in seeds]  # one at a time: each equals its own
  return built[0][0], stack([state for _, state in built])


def stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, k: int):
  """The k-th seed of a stacked tree."""
  return jax.tree.map(lambda x: x[k], tree)


def make_train_step(family, model_def: ModelDef, tx: optax.GradientTransformation,
                    batch_size: int, loops: int):
  """The pure step (state, step) -> (state, metrics) of one seed: sample, loss, gradient,
  optax update.  metrics: loss, grad_norm and the family's aux scalars."""
  loss_of = family.make_loss()

  def loss_fn(params, batch):
    return loss_of(model_def.merge(params), batch, loops)

  def step_fn(state, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["data_key"]), step)
    batch = family.sample(key, batch_size)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "data_key": state["data_key"]}
    return new_state, {"loss": loss, "grad_norm": optim.global_norm(grads), **aux}

  return step_fn


def scan_steps(step_fn, state, first_step, length: int, bad=None, max_skips: int = 0):
  """Runs `length` steps from `first_step` in one lax.scan: (state, first_bad_step, metrics).

  A step whose loss or gradient is not finite leaves the state unchanged.  Up to `max_skips`
  such steps in a row (`train.nonfinite_skips`) are skipped and training goes on with the next
  batch (metrics["skipped"] = 1); the one after that stops the seed: it and every later step
  leave the state unchanged and first_bad_step is that step (−1 if none).  `bad` carries the flag
  in from earlier chunks (a stopped seed stays frozen); None means −1.  The streak restarts at
  each chunk.
  """
  def body(carry, step):
    state, bad, streak = carry
    new_state, metrics = step_fn(state, step)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    alive = bad < 0
    streak = jnp.where(finite, 0, streak + 1)
    stop = alive & (streak > max_skips)
    ok = finite & alive
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    bad = jnp.where(stop, step, bad)
    # skipped: a non-finite step the seed survives (not the one that stops it, nor a stopped one's)
    metrics = dict(metrics, skipped=(alive & ~finite & ~stop).astype(jnp.float32))
    return (state, bad, streak), metrics

  steps = first_step + jnp.arange(length, dtype=jnp.int32)
  bad = jnp.int32(-1) if bad is None else bad
  (state, bad, _), metrics = jax.lax.scan(body, (state, bad, jnp.int32(0)), steps)
  return state, bad, metrics


# -- placement ------------------------------------------------------------------------------------

SEED_AXIS = "seeds"


def seed_mesh(num_seeds: int) -> Mesh | None:
  """A 1-D mesh over the most devices (of jax.devices()) that divide `num_seeds`; None for one."""
  devices = jax.devices()
  count = max(c for c in range(1, len(devices) + 1) if num_seeds % c == 0)
  return None if count == 1 else Mesh(np.asarray(devices[:count]), (SEED_AXIS,))


class Placement(NamedTuple):
  """Where K stacked seeds run: `seeds` splits the seed axis, `data` the batch of one seed."""
  seeds: Mesh | None
  data: Mesh | None

  @classmethod
  def of(cls, num_seeds: int, batch_size: int) -> "Placement":
    if num_seeds == 1:  # one seed: data parallel over every device (None on one device)
      return cls(None, distributed.data_mesh(batch_size))
    return cls(seed_mesh(num_seeds), None)

  def sharding(self):
    """Of everything a chunk takes and returns (states, bad, metrics): None on one device."""
    if self.seeds is not None:
      return NamedSharding(self.seeds, PartitionSpec(SEED_AXIS))
    if self.data is not None:
      return distributed.replicated(self.data)
    return None

  def place(self, tree):
    """Host or device arrays -> where the chunk wants them (replicated values are built from
    host copies, correct on one host and on many)."""
    sharding = self.sharding()
    if sharding is None:
      return tree
    if self.data is not None:
      return distributed.place_state(tree, self.data)
    return jax.device_put(tree, sharding)


def make_chunk(family, model_def, tx, batch_size: int, loops: int, placement: Placement):
  """A jitted (states, bad, first_step, length) -> (states, bad, metrics), vmapped over seeds.

  states: stacked [K, ...]; bad: [K] int32; metrics: dict of [K, length].  States are donated.
  With a data mesh the call returns once the chunk is computed.
  """
  if placement.data is not None:
    family = distributed.ShardedFamily(family, placement.data)
  step_fn = make_train_step(family, model_def, tx, batch_size, loops)
  skips = int(family.config.train.nonfinite_skips)

  @functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,),
                     out_shardings=placement.sharding())
  def chunk(states, bad, first_step, length):
    run = lambda state, b: scan_steps(step_fn, state, first_step, length, bad=b, max_skips=skips)
    return jax.vmap(run)(states, bad)

  if placement.data is None:
    return chunk

  def blocking(*args):
    # One sharded program in flight at a time: XLA's CPU collectives abort when several wait on
    # each other (distributed.block).
    return distributed.block(chunk(*args))

  blocking.lower = chunk.lower
  return blocking


def compile_ahead(plan, make, states, bad, workers: int | None = None) -> dict:
  """{(loops, length): Future of the compiled chunk}: every program `plan` needs, compiled on
  `workers` threads (default: one per CPU core) in the order the plan first needs them.

  Why: a loop curriculum needs one program per loop count (20 at T = 20, ~2.5 s of XLA
  compilation each on a CPU); compiled one at a time each stalls the training between two phases.
  XLA compiles without the GIL, so here they overlap each other and the training of the phases
  before them.  The programs are the ones `jax.jit` would build (same HLO, same numbers); call one
  as `compiled(states, bad, first_step)` (the static length is baked in).  `states` and `bad`
  only give shapes, dtypes and shardings (they may be donated meanwhile).
  """
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  states, bad = jax.tree.map(spec, (states, bad))
  step = jax.ShapeDtypeStruct((), jnp.int32)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
  chunks, futures = {}, {}
  for _, length, loops in plan:
    if (loops, length) in futures:
      continue
    if loops not in chunks:
      chunks[loops] = make(loops)
    futures[(loops, length)] = pool.submit(
        lambda c, n: c.lower(states, bad, step, n).compile(), chunks[loops], length)
  pool.shutdown(wait=False)  # the queued compiles still run; nothing new is accepted
  return futures
