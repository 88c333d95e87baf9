"""Vector generation: the m = d queries are e_1..e_d, so the read-out is the weight matrix Ŵ_T.

  python scripts/train.py --config configs/vector_generation.py --workdir runs/vg
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  config = default.get_config()
  config.task.kind = "vector_generation"
  return config
