"""Learned from scratch (docs/learning.md): the default recipe against GD and PGD, 4 seeds.

Every setting trains `configs/default.py` as it is — random init, only the task and
`model.loops` changed — with 4 seeds in one vmapped program, and reads each seed at loops
1 … 4T on its own 8192 held-out prompts beside GD with one constant step and preconditioned GD
with c·Σ⁻¹ (both inside the model class), each with the step that is best for the mean at T over
32 768 other prompts (and, for reference, with the step best on the held-out prompts themselves:
an oracle in hindsight).
The settings cover the issue-17 list: d ≤ 20, n/d from 1.5 to 8, κ_Σ ∈ {1, 10, 100}, Σ
axis-aligned or rotated, T ≤ 20.

  python scripts/learning.py --config configs/learning.py --workdir runs/learning

Rerunning the same command resumes (finished settings in <workdir>/points/ are skipped).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = default.get_config()  # the recipe under test: the default, unchanged

  config.grid = ml_collections.ConfigDict()
  # (d, n/d, κ_Σ, rotate Σ, T): n = round(n/d · d).  κ_Σ = 1 is isotropic (rotation is moot).
  config.grid.settings = (
      (5, 4.0, 1.0, False, 1), (5, 4.0, 10.0, True, 1),        # T = 1: the one-layer closed form
      (10, 4.0, 1.0, False, 5), (10, 1.5, 1.0, False, 20), (10, 4.0, 1.0, False, 20),
      (10, 8.0, 1.0, False, 20), (20, 4.0, 1.0, False, 10),
      (10, 4.0, 10.0, False, 10), (10, 4.0, 10.0, True, 10), (10, 1.5, 10.0, True, 20),
      (20, 2.0, 10.0, True, 10),
      (10, 4.0, 100.0, False, 10), (10, 4.0, 100.0, True, 10), (10, 8.0, 100.0, True, 20),
      (10, 1.5, 100.0, True, 5),
  )
  config.grid.seeds = (0, 1, 2, 3)
  config.grid.eval_prompts = 8192     # held-out prompts per seed.  2048 made the mean at T = 20 a coin:
                                      # E's seed 3 was 2.18x PGD on its 2048 and 0.75x over 65 536 (its
                                      # verdict flipped on 7 of 32 sets of 2048; docs/learning.md)
  config.grid.eval_seed = 1234        # seed of the held-out and tuning prompts
  config.grid.tune_prompts = 32768    # prompts GD's / PGD's step is tuned on (none of them held out)
  config.grid.extrapolation = 4       # read every seed at loops 1 … 4T
  config.grid.target = 1.1            # trained ≤ target × min(GD, PGD), mean and median
  config.grid.cpu_devices = 0         # one device: the fused CPU kernel trains the seeds
  config.grid.figures = True
  return config
