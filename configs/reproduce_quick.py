"""A reduced reproduction grid that runs in under 10 minutes on a 2-core CPU.

d = 10, both task kinds, n/d ∈ {1, 4}, κ_Σ = 1; the GD construction at T = 1..12, trained
models at T ∈ {1, 2, 5, 10}; 3 seeds vmapped in one program per point; the GD warm start of
configs/reproduce.py without its loop curriculum (fewer compiled programs), 800 steps.

  python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick
"""
import importlib.util
import os


def _sibling(filename):
  """Loads configs/<filename> by path (config files are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
  spec = importlib.util.spec_from_file_location("loopicl_config_" + filename[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


reproduce = _sibling("reproduce.py")


def get_config():
  config = reproduce.get_config()
  # The quick recipe (what docs/reproduction.md's quick-grid numbers come from): the GD warm start
  # without the loop curriculum — T ≤ 10 trains without it (0/48 seeds diverged), and each
  # curriculum stage is one more compiled program.
  e = config.experiment
  e.model.init_step = 0.3
  e.train.learning_rate = 5e-4
  e.train.warmup_steps = 200
  e.train.curriculum_start = 0
  e.train.steps = 800
  g = config.grid
  g.ds = (10,)
  g.n_over_d = (1.0, 4.0)
  g.condition_numbers = (1.0,)
  g.loops = tuple(range(1, 13))
  g.trained_loops = (1, 2, 5, 10)
  g.fixed_loops = 10
  g.fixed_n_over_d = 4.0
  g.eval_prompts = 1024
  return config
