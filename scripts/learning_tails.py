"""Reports on a finished learning workdir (scripts/learning.py): which prompts decide each seed's
mean (--tails), and each seed, GD and PGD read on N fresh prompts (--population=N).

  python scripts/learning_tails.py --config configs/learning.py --workdir runs/learning --tails
  python scripts/learning_tails.py --config configs/learning.py --workdir runs/learning --population=65536

A bad config or flag is one line on stderr (exit status 2).  The reports:
loopicl/experiments/learning_tails.py; flags: loopicl/cli.py.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_learning_tails()
