"""Train a looped transformer.

  python scripts/train.py --config configs/default.py --workdir runs/default
  python scripts/train.py --config configs/default.py --workdir runs/t10 --config.model.loops=10

Rerunning the same command with the same --workdir resumes from the newest good checkpoint.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_train()
