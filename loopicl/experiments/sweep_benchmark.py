"""Wall time of K seeds trained in one vmapped program against K sequential single-seed runs.

Both sides do the same training work on the same config: the sequential side is what K separate
runs do (each builds and compiles its own one-seed program, step.make_chunk, then runs its chunks); the
vmapped side is `sweep.train_seeds` (one compile, K seeds per dispatch).  Evaluation and
checkpointing are left out of both.  With k host CPU devices each sequential run splits its batch
over them (data parallel, as train.py does), the vmapped program splits the seeds
(step.seed_mesh).  scripts/benchmark_sweep.py is the command line (cli.run_benchmark_sweep).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import registry, optim, schedule, step as step_lib, sweep


def sequential(config, seeds):
  """K single-seed runs one after another (each the loop's K = 1 program, as train.py runs it);
  returns (total s, first-chunk s summed, params)."""
  total, first, out = time.time(), 0.0, []
  for seed in seeds:
    family = registry.of(config, training=True)
    tx = optim.make_optimizer(config.train)
    model_def, states = step_lib.init_states(family, tx, [seed])
    placement = step_lib.Placement.of(1, int(config.train.batch_size))
    states, bad = placement.place((states, jnp.full((1,), -1, jnp.int32)))
    chunks = {}
    for i, (step, length, loops) in enumerate(schedule.chunk_plan(config)):
      t0 = time.time()
      if loops not in chunks:
        chunks[loops] = step_lib.make_chunk(family, model_def, tx, int(config.train.batch_size),
                                            loops, placement)
      states, bad, _ = chunks[loops](states, bad, jnp.int32(step), length)
      if i == 0:
        jax.block_until_ready(states)
        first += time.time() - t0
    out.append(jax.device_get(step_lib.unstack(states["params"], 0)))
  return time.time() - total, first, out


def compare(config, seeds, log=print) -> dict:
  """Times both sides and checks they trained the same parameters; logs one line per result."""
  c = config
  log(f"config: {c.task.kind}, d={c.task.d}, n={c.task.n_context}, T={c.model.loops}, batch "
      f"{c.train.batch_size}, {c.train.steps} steps, {c.train.steps_per_call} steps per call; "
      f"K={len(seeds)} seeds; {jax.device_count()} {jax.default_backend()} device(s), "
      f"{os.cpu_count()} CPU cores")
  t0 = time.time()
  result = sweep.train_seeds(config, seeds)
  t_vmap = time.time() - t0
  log(f"vmapped   : {t_vmap:7.1f} s for {len(seeds)} seeds")
  t_seq, t_first, params = sequential(config, seeds)
  log(f"sequential: {t_seq:7.1f} s for {len(seeds)} runs ({t_first:.1f} s of it in the runs' first "
      f"chunks: compilation)")
  diff = max(float(np.max(np.abs(np.asarray(result.params[name][k]) - np.asarray(params[k][name]))))
             for k in range(len(seeds)) for name in params[k])
  log(f"speed-up  : {t_seq / t_vmap:.2f}x  (max |param difference| vmapped vs sequential: {diff:.2e})")
  return {"vmapped_s": t_vmap, "sequential_s": t_seq, "first_chunks_s": t_first,
          "speedup": t_seq / t_vmap, "max_param_difference": diff}
