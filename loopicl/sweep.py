"""Train K seeds of one config in one jitted program (jax.vmap over the training state).

`train.make_train_step` is a pure (state, step) -> (state, metrics) whose state holds the
parameters, the optimizer state and the `data_key`.  Everything that differs between two seeds of
a run lives in that state, so `jax.vmap` over a stack of K states is K independent runs in one
program: one compile, one dispatch per chunk, and matrix products K times wider — on a CPU K
seeds cost far less than K separate runs (scripts/benchmark_sweep.py measures it).

Each seed is exactly the run `train.train_and_evaluate` makes with `train.seed = s`: parameters
from fold_in(key(s), 0), data key fold_in(key(s), 1), batch of step t from fold_in(data_key, t),
the same loop curriculum (`train.loops_at`) and chunk plan (`train.chunk_plan`).  tests/test_reproduce.py checks the two agree.

Several devices (GPUs, or host CPU devices from `config.cpu_devices`): the seed axis is split
over a 1-D "seeds" mesh — each device trains its own seeds, and since no operation mixes the
lanes the program has no collectives at all (none of the all-reduce rendezvous of data
parallelism).  The mesh takes the largest device count that divides K; on a 2-core CPU 4 seeds
over 2 devices run about 1.7–2.4× faster than on one (docs/reproduction.md).

Divergence stays per seed: a seed whose loss or gradient turns non-finite freezes at its last
good state from that step on (through every later chunk) and is reported in `diverged_at`; the
other seeds go on untouched, because no operation mixes the vmapped lanes.

  result = sweep.train_seeds(config, seeds=[0, 1, 2])
  result.params            # the parameter pytree, every leaf stacked: [K, ...]
  result.diverged_at       # [K] int: first non-finite step, −1 if the seed never diverged
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopicl import config as config_lib, family as family_lib, stats, train


def init_states(family, tx, seeds):
  """(model_def, states): the initial training states of `seeds`, every leaf stacked [K, ...].

  Seed s is initialised as a single run with train.seed = s is (`train.init_state`): the same
  keys, so the same parameters and the same stream of batches.
  """
  # Built one seed at a time (init is cheap) so each equals its single-run counterpart exactly.
  built = [train.init_state(family, tx, int(s)) for s in seeds]
  states = [state for _, state in built]
  return built[0][0], jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


SEED_AXIS = "seeds"


def seed_mesh(num_seeds: int) -> Mesh | None:
  """A 1-D mesh over the most devices (of jax.devices()) that divide `num_seeds`; None for one."""
  devices = jax.devices()
  count = max(c for c in range(1, len(devices) + 1) if num_seeds % c == 0)
  return None if count == 1 else Mesh(np.asarray(devices[:count]), (SEED_AXIS,))


def place_seeds(tree, mesh: Mesh | None):
  """Splits the leading (seed) axis of every leaf over `mesh` (identity without one)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(SEED_AXIS)))


def make_sweep_chunk(family, model_def, tx, batch_size: int, loops: int, mesh: Mesh | None = None):
  """A jitted (states, bad, first_step, length) -> (states, bad, metrics), vmapped over seeds.

  states: stacked [K, ...]; bad: [K] int32; metrics: dict of [K, length].  States are donated.
  With `mesh`, the K seeds stay split over its devices (inputs placed by `place_seeds`).
  """
  step_fn = train.make_train_step(family, model_def, tx, batch_size, loops)
  split = None if mesh is None else NamedSharding(mesh, PartitionSpec(SEED_AXIS))

  @functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,), out_shardings=split)
  def chunk(states, bad, first_step, length):
    skips = int(family.config.train.get("nonfinite_skips", 0))
    run = lambda state, b: train.scan_steps(step_fn, state, first_step, length, bad=b, max_skips=skips)
    return jax.vmap(run)(states, bad)

  return chunk


def compile_ahead(plan, make_chunk, states, bad, workers: int | None = None) -> dict:
  """{(loops, length): Future of the compiled chunk}: every program `plan` needs, compiled on
  `workers` threads (default: one per CPU core) in the order the plan first needs them.

  Why: a loop curriculum needs one program per loop count (20 at T = 20, ~2.5 s of XLA
  compilation each on a CPU), and compiled one at a time each one stalls the training between two
  phases.  XLA compiles without the GIL, so here they overlap each other and the training of the
  phases before them.  The programs are the ones `jax.jit` would build (same HLO, same numbers);
  call one as `compiled(states, bad, first_step)` (the static length is baked in).  `states` and
  `bad` only give shapes, dtypes and shardings (they may be donated meanwhile).
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
      chunks[loops] = make_chunk(loops)
    futures[(loops, length)] = pool.submit(
        lambda c, n: c.lower(states, bad, step, n).compile(), chunks[loops], length)
  pool.shutdown(wait=False)  # the queued compiles still run; nothing new is accepted
  return futures


class SweepResult(NamedTuple):
  """What `train_seeds` returns (host numpy arrays).

  params:       the parameter pure-dict, each leaf [K, ...] (the last good state of each seed).
  diverged_at:  [K] int64, the step that stopped a seed (more than `train.nonfinite_skips`
                non-finite steps in a row), −1 if none.
  skipped:      [K] int64, non-finite steps skipped (state unchanged) before any stop.
  final_loss:   [K] mean training loss of each seed over its last chunk (NaN-free only if alive).
  loss_curve:   [K, chunks] mean training loss per chunk.
  model_def:    train.ModelDef: model_def.merge(params of one seed) is that seed's model.
  wall_s:       seconds spent training (compilation included).
  """
  params: dict
  diverged_at: np.ndarray
  skipped: np.ndarray
  final_loss: np.ndarray
  loss_curve: np.ndarray
  model_def: object
  wall_s: float


def train_seeds(config, seeds, *, log: Callable[[str], None] | None = None,
                log_every_s: float = 30.0) -> SweepResult:
  """Trains `config` once per seed in `seeds`, all seeds in one vmapped program.

  config.train.seed is ignored (the seeds replace it).  `log` (if given) gets a progress line at
  most every `log_every_s` seconds.  Raises errors.ConfigError for a bad config.
  """
  config_lib.validate(config)
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds=[] is invalid; allowed: a non-empty list of integers >= 0")
  family = family_lib.of(config)
  tx = train.family_optimizer(family)
  model_def, states = init_states(family, tx, seeds)
  mesh = seed_mesh(len(seeds))
  states, bad = place_seeds((states, jnp.full((len(seeds),), -1, jnp.int32)), mesh)
  curve = []
  skipped = np.zeros(len(seeds), np.int64)
  start = last_log = time.time()
  plan = train.chunk_plan(config)
  programs = compile_ahead(plan, lambda loops: make_sweep_chunk(
      family, model_def, tx, int(config.train.batch_size), loops, mesh), states, bad)
  try:
    for first, length, loops in plan:
      states, bad, metrics = programs[(loops, length)].result()(states, bad, jnp.int32(first))
      curve.append(stats.finite_mean(np.asarray(metrics["loss"], np.float64))[0])  # [K]
      skipped += np.asarray(metrics["skipped"]).sum(axis=1).astype(np.int64)
      if log is not None and time.time() - last_log > log_every_s:
        last_log = time.time()
        alive = int(np.sum(np.asarray(bad) < 0))
        finite = curve[-1][np.isfinite(curve[-1])]  # no "All-NaN slice" warning once all diverged
        median = f"{np.median(finite):.3e}" if finite.size else "nan"
        log(f"  step {first + length}/{config.train.steps} (T={loops}): loss "
            f"{median} median over seeds, {alive}/{len(seeds)} alive, "
            f"{last_log - start:.0f} s")
  finally:
    for future in programs.values():  # an interrupted run does not wait for unneeded compiles
      future.cancel()
  params = jax.device_get(states["params"])
  curve = np.stack(curve, axis=1) if curve else np.zeros((len(seeds), 0))
  return SweepResult(params=params, diverged_at=np.asarray(bad, np.int64), skipped=skipped,
                     final_loss=curve[:, -1] if curve.size else np.full(len(seeds), np.nan),
                     loss_curve=curve, model_def=model_def, wall_s=time.time() - start)


def seed_params(result: SweepResult, k: int) -> dict:
  """The parameter pure-dict of the k-th seed of a sweep."""
  return jax.tree.map(lambda leaf: np.asarray(leaf[k]), result.params)


def seed_model(result: SweepResult, k: int):
  """The NNX model of the k-th seed of a sweep."""
  return result.model_def.merge(seed_params(result, k))
