"""One way to turn results into JSON and write them: numpy → Python, non-finite floats handled.

JSON has no NaN or inf.  Reports write them as null (`nonfinite=None`: the counts beside them say
why); metrics.jsonl writes them as the strings "nan", "inf", "-inf" (`nonfinite="string"`), so a
reader of the training log sees which way a metric blew up.  Files are written atomically.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np


def clean(x, nonfinite=None):
  """Recursively: numpy scalars/arrays → Python, NaN/inf floats → None or their string."""
  if isinstance(x, dict):
    return {str(k): clean(v, nonfinite) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v, nonfinite) for v in x]
  if isinstance(x, np.ndarray):
    return clean(x.tolist(), nonfinite)
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    if math.isfinite(x):
      return x
    return str(x) if nonfinite == "string" else None
  return x


def dumps(x, *, nonfinite=None, **kwargs) -> str:
  return json.dumps(clean(x, nonfinite), allow_nan=False, **kwargs)


def write(path: str, x, *, nonfinite=None, **kwargs) -> None:
  """Writes `x` as JSON to `path` atomically (a crash leaves the old file or the new, never half)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(dumps(x, nonfinite=nonfinite, **kwargs))
  os.replace(tmp, path)
