"""Train the default recipe from scratch on every setting of a learning config and compare it
with GD and preconditioned GD; writes learning.csv, summary.md and extrapolation.png into --workdir.

  python scripts/learning.py --config configs/learning.py --workdir runs/learning

The reports on a finished workdir (--tails, --population=N) are scripts/learning_tails.py.

Rerunning the same command resumes.  A bad config or flag is one line on stderr (exit status 2).
The experiment: loopicl/experiments/learning.py; flags: loopicl/cli.py.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_learning()
