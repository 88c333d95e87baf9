"""Evaluate a training run: what did the looped transformer learn, and how close is it to GD?

  python scripts/evaluate.py --workdir runs/default
  python scripts/evaluate.py --workdir runs/default --loops_max 60 --num_prompts 8192

Writes <workdir>/eval/{report.json, report.md, *.png, weights.npz} and TensorBoard scalars and
figures under analysis/ in the run's log directory. Errors are one line on stderr, exit status 2.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_evaluate()
