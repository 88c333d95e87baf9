"""Wall time of K seeds trained in one vmapped program vs K sequential single-seed runs.

  python scripts/benchmark_sweep.py                    # K = 8, configs/default.py, 300 steps
  python scripts/benchmark_sweep.py --seeds 8 --steps 1000 --loops 10
  python scripts/benchmark_sweep.py --cpu_devices 2     # both sides on 2 host CPU devices

Prints total wall times, the speed-up, and the part of each spent in the first chunk
(compilation + first steps).  On a shared CPU, run it twice.  What each side does:
loopicl/experiments/sweep_benchmark.py; flags: loopicl/cli.py.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_benchmark_sweep()
