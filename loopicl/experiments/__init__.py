"""Studies built on the library, each with its script in scripts/:

  reproduce/           the grid that tests the source paper's claim (scripts/reproduce.py)
  benchmark.py         speed of the real training step against the matmul peak (scripts/benchmark.py)
  benchmark_modes.py   the benchmark's n-scaling, remat-memory and host-device modes, its table
  sweep_benchmark.py   K vmapped seeds against K separate runs (scripts/benchmark_sweep.py)
"""
