"""Launch a family of runs: swept config fields × seeds, each seed an ordinary run directory.

  python scripts/sweep.py --config configs/default.py --sweep model.loops=5,10,20 \\
      --sweep train.learning_rate=1e-3,3e-3 --seeds 4 --workdir runs/sweep1
  tensorboard --logdir runs/sweep1          # every run, the HParams tab compares them

Rerunning the same command resumes.  Writes <workdir>/sweep.csv, summary.md and sweep.png (+.pdf).
How: loopicl/experiments/sweep_runs.py; flags: loopicl/cli.py.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_sweep()
