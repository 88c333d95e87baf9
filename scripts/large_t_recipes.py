"""Which training recipe makes a T = 20 looped transformer train: the table of docs/reproduction.md.

  python scripts/large_t_recipes.py --workdir runs/large_t            # every recipe (~12 min, 2 cores)
  python scripts/large_t_recipes.py --workdir runs/large_t --recipes window,last_loop

The recipes and what is measured: loopicl/experiments/large_t.py; flags: loopicl/cli.py.
Rerunning resumes.
"""
from loopicl import cli

if __name__ == "__main__":
  cli.run_large_t_recipes()
