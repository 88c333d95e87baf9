"""The source paper's setting (Chen et al., AISTATS 2025): d = 20, n = 4d = 80, T = 10 loops.

Well-conditioned isotropic data at n = O(d) examples, where T loops of GD reach small error.

  python scripts/train.py --config configs/paper.py --workdir runs/paper
  python scripts/train.py --config configs/paper.py --workdir runs/paper_vg --config.task.kind=vector_generation
"""
from configs import default


def get_config():
  config = default.get_config()
  config.task.d = 20
  config.task.n_context = 80        # n = 4d: κ̂ ≈ 9
  config.model.loops = 10
  config.train.steps = 20000
  config.train.batch_size = 256
  config.train.warmup_steps = 500
  config.eval.every = 1000
  config.checkpoint.every = 2000
  return config
