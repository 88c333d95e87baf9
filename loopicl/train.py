"""The training job: one run of any task family in a run directory (scripts/train.py).

A run is one seed of the shared training loop (loop.py: `loop.train(config, [seed], [workdir])`);
this module adds what only the job has: the config check before any work, multi-host start-up
(only process 0 writes), and one-line errors for a run that cannot go on.

  result = train.train_and_evaluate(config, "runs/default")
  result["test_error"], result["step"]
"""
from __future__ import annotations

import jax
import ml_collections

from loopicl import config as config_lib, distributed, loop
from loopicl.errors import RunError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, log=print,
                       progress: bool = True) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics.

  The returned dict holds the last evaluation's metrics plus `step`, and `interrupted` (the
  signal's name) if SIGTERM/SIGINT stopped the run after saving a checkpoint.  Raises
  errors.ConfigError for a bad config (before any work) and RunError when the run cannot go
  on (non-finite loss, incompatible workdir); both carry one-line messages.
  """
  config_lib.validate(config)
  distributed.maybe_initialize(config)
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *a, **k: None)
  result = loop.train(config, [int(config.train.seed)], [workdir], log=log, progress=progress,
                      is_main=is_main)
  if result.diverged_at[0] >= 0:
    good = result.checkpoints[0]
    raise RunError(f"non-finite loss or gradient at step {int(result.diverged_at[0])}; stopped "
                   f"without saving. Last good checkpoint: step {good if good is not None else 'none'} (kept)")
  out = dict(result.evaluations[0], step=result.step)
  if result.interrupted is not None:
    out["interrupted"] = result.interrupted
  return out
