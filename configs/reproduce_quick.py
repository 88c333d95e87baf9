"""A reduced reproduction grid that runs in under 10 minutes on a 2-core CPU.

d = 10, both task kinds, n/d ∈ {1, 4}, κ_Σ = 1, T = 1..12 for the GD construction and for one
model per setting trained at T = 12 with the loss on every loop and read at every T (the
`configs/reproduce.py` recipe and window mode, 800 steps); 4 seeds vmapped in one program per
point, split over 2 host CPU devices.

  python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick
"""
from configs import reproduce


def get_config():
  config = reproduce.get_config()
  config.experiment.train.steps = 800  # the curriculum reaches T = 12 at step 440
  g = config.grid
  g.ds = (10,)
  g.n_over_d = (1.0, 4.0)
  g.condition_numbers = (1.0,)
  g.loops = tuple(range(1, 13))
  g.trained_loops = tuple(range(1, 13))
  g.weight_loops = (4, 8)
  g.fixed_loops = 10
  g.fixed_n_over_d = 4.0
  g.eval_prompts = 1024
  return config
