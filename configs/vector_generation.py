"""Vector generation: the m = d queries are e_1..e_d, so the read-out is the weight matrix Ŵ_T.

  python scripts/train.py --config configs/vector_generation.py --workdir runs/vg
"""
from configs import default


def get_config():
  config = default.get_config()
  config.task.kind = "vector_generation"
  return config
