"""Throughput of the training step, FLOPs, fraction of the matmul peak (loopicl/experiments/benchmark.py).

  python scripts/benchmark.py --config configs/default.py
  python scripts/benchmark.py --config configs/default.py --config.task.d=20 \\
      --config.model.loops=10 --config.train.batch_size=256 --config.train.steps_per_call=10 \\
      --config.model.unroll=10 --config.cpu_devices=2          # the paper-like config, 2 cores
  python scripts/benchmark.py --config configs/default.py --n_scaling --remat_memory \\
      --fake_devices=1,2,4 --json

With --json the last line of the output is one JSON object with every number (steps_per_s,
examples_per_s, flops_per_step, achieved_flops_per_s, naive_steps_per_s,
matmul_peak_flops_per_s, peak_fraction, …).  Numbers taken on a shared machine are noisy: each is
the best of --repeats chunks, printed beside the load average.  Flags: loopicl/cli.py.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_benchmark()
