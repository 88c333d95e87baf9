"""Run the reproduction grid and write results.csv, summary.md and the figures into --workdir.

  python scripts/reproduce.py --config configs/reproduce.py --workdir runs/reproduce
  python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick

Rerunning the same command resumes: finished grid points (<workdir>/points/*.json) are skipped.
A bad config or flag is reported as one line on stderr with exit status 2.  The grid:
loopicl/experiments/reproduce/; flags: loopicl/cli.py.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_reproduce()
