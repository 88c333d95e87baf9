"""The quick reproduction grid with its trained models learned from scratch (issue 17, item 5).

`configs/reproduce_quick.py` with the training template replaced by the default recipe
(`configs/default.py`: random init 1e-6, only the construction's blocks updated, loop curriculum,
steps = 100·T + 2000 at κ_Σ = 1 then, Adam 1e-2 then; SOAP now) — still in window mode (one model at T = 20, the loss
on every loop divided by GD's) — and the seeds on one CPU device (the fused kernel).  Measured
(docs/learning.md): at n/d = 8 it ends below the construction from T = 5 on, at n/d = 2 its mean at
T = 20 is ~300× the construction's (a few prompts blow up; the median is 10× below).  The full
grid keeps the GD warm start until that is fixed.

  python scripts/reproduce.py --config configs/reproduce_quick_scratch.py --workdir runs/reproduce_quick_scratch
"""
from configs import default, reproduce_quick


def get_config():
  config = reproduce_quick.get_config()
  config.experiment = default.get_config()  # from scratch: the default recipe
  config.grid.cpu_devices = 0               # one device: the fused CPU kernel trains the seeds
  return config
