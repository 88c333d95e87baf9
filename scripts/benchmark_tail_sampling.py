"""What one training batch costs to draw: uniform, and tail-holding with the candidates drawn and
scored by XLA (jnp Philox, batched dots) or by the fused CPU kernel, which draws and scores each
candidate in its SIMD lanes (loopicl/linear/tail_sampling.py; training on one CPU device uses the
kernel).  K seeds vmapped, as the sweep and the learning table draw them; milliseconds per
step (one draw for all seeds), median of `--repeats` timings.

  python scripts/benchmark_tail_sampling.py                       # d = 10, n ∈ {15, 40, 80}; d = 20, n ∈ {40, 80}
  python scripts/benchmark_tail_sampling.py --shapes=10x80 --seeds=1
"""
import time

from absl import app, flags
import jax
import numpy as np

from configs import default
from loopicl import prng
from loopicl.linear import tail_sampling, tasks

flags.DEFINE_list("shapes", ["10x15", "10x40", "10x80", "20x40", "20x80"], "d x n of the task")
flags.DEFINE_integer("seeds", 4, "seeds vmapped (the table trains 4)")
flags.DEFINE_integer("batch_size", 128, "prompts per batch")
flags.DEFINE_integer("pool", 8, "candidates per batch prompt (linear.tail_pool; \"auto\": tail_sampling.auto_pool, 64 at T >= 20 and n < 3d, else 8)")
flags.DEFINE_integer("repeats", 30, "timed draws")
FLAGS = flags.FLAGS


def _ms(fn, keys) -> float:
  jax.block_until_ready(fn(keys))  # compile
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(keys))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main(_):
  prng.use_unrolled_threefry()  # as training does
  B, pool, tail = FLAGS.batch_size, FLAGS.pool, FLAGS.batch_size // 8
  keys = jax.random.split(jax.random.key(0), FLAGS.seeds)
  print(f"ms per step, {FLAGS.seeds} seeds vmapped, batch {B}, {pool}·{B} candidates, tail {tail} "
        f"({jax.devices()[0].platform})")
  print("d    n    uniform   tail, XLA         tail, kernel")
  for shape in FLAGS.shapes:
    d, n = (int(x) for x in shape.split("x"))
    task = default.get_config().task
    task.d, task.n_context = d, n
    draw = lambda kernel: jax.jit(jax.vmap(
        lambda k: tail_sampling.sample(k, task, B, pool, tail, kernel=kernel).Z0))
    uniform = _ms(jax.jit(jax.vmap(lambda k: tasks.sample(k, task, B).Z0)), keys)
    xla, fused = _ms(draw(False), keys), _ms(draw(True), keys)
    print(f"{d:<4} {n:<4} {uniform:7.1f}   {xla:15.1f}   {fused:18.1f}")


if __name__ == "__main__":
  app.run(main)
