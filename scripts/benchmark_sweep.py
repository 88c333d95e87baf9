"""Wall time of K seeds trained in one vmapped program vs K sequential single-seed runs.

  python scripts/benchmark_sweep.py                    # K = 8, configs/default.py, 300 steps
  python scripts/benchmark_sweep.py --seeds 8 --steps 1000 --loops 10
  python scripts/benchmark_sweep.py --cpu-devices 2     # both sides on 2 host CPU devices

Both sides do the same training work on the same config: the sequential side is what K separate
runs do (each builds and compiles its own `train.make_train_chunk`, then runs its chunks); the
vmapped side is `sweep.train_seeds` (one compile, K seeds per dispatch).  Evaluation and
checkpointing are left out of both.  Prints total wall times, the speed-up, and the part of each
spent in the first chunk (compilation + first steps).  On a shared CPU, run it twice.  With
--cpu-devices k both sides see k host devices: each sequential run splits its batch over them
(data parallel, as train.py does), the vmapped program splits the seeds (sweep.seed_mesh).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from loopicl import config as config_lib, distributed, objectives, sweep, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sequential(config, seeds):
  """K single-seed runs one after another; returns (total s, first-chunk s summed, params)."""
  total, first, out = time.time(), 0.0, []
  for seed in seeds:
    objective = objectives.make_objective(config)
    tx = train.make_optimizer(config.train)
    graphdef, state = sweep.init_states(objective, config, tx, [seed])
    state = jax.tree.map(lambda x: x[0], state)
    chunks = {}
    for i, (step, length, loops) in enumerate(sweep.chunk_boundaries(config)):
      t0 = time.time()
      if loops not in chunks:
        chunks[loops] = train.make_train_chunk(objective, graphdef, tx,
                                               int(config.train.batch_size), loops)
      state, bad, _ = chunks[loops](state, jnp.int32(step), length)
      if i == 0:
        jax.block_until_ready(state)
        first += time.time() - t0
    out.append(jax.device_get(state["params"]))
  return time.time() - total, first, out


def vmapped(config, seeds):
  t0 = time.time()
  result = sweep.train_seeds(config, seeds)
  return time.time() - t0, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
  parser.add_argument("--seeds", type=int, default=8, help="K")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--loops", type=int, default=None, help="model.loops (default: the config's)")
  parser.add_argument("--cpu-devices", type=int, default=0, help="host CPU devices (0: one)")
  args = parser.parse_args()
  distributed.set_cpu_devices(args.cpu_devices)  # before any JAX computation
  config = config_lib.load_file(args.config)
  config.train.steps = args.steps
  if args.loops:
    config.model.loops = args.loops
  seeds = list(range(args.seeds))
  c = config
  print(f"config: {os.path.relpath(args.config, ROOT)}, {c.task.kind}, d={c.task.d}, n={c.task.n_context}, "
        f"T={c.model.loops}, batch {c.train.batch_size}, {c.train.steps} steps, "
        f"{c.train.steps_per_call} steps per call; K={len(seeds)} seeds; "
        f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU cores", flush=True)
  t_vmap, result = vmapped(config, seeds)
  print(f"vmapped   : {t_vmap:7.1f} s for {len(seeds)} seeds", flush=True)
  t_seq, t_first, params = sequential(config, seeds)
  print(f"sequential: {t_seq:7.1f} s for {len(seeds)} runs ({t_first:.1f} s of it in the runs' first "
        f"chunks: compilation)", flush=True)
  diff = max(float(np.max(np.abs(np.asarray(result.params[name][k]) - np.asarray(params[k][name]))))
             for k in range(len(seeds)) for name in params[k])
  print(f"speed-up  : {t_seq / t_vmap:.2f}x  (max |param difference| vmapped vs sequential: {diff:.2e})")


if __name__ == "__main__":
  main()
