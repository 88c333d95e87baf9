"""Train K seeds of one config in memory, in one vmapped program (the studies' trainer).

Each seed is exactly the run `train.train_and_evaluate` makes with train.seed = s — the same
loop (loop.py), without a run directory: no checkpoints, logs or evaluation; the caller evaluates.
Several devices split the seed axis (step.py: no collectives); on a 2-core CPU 4 seeds over 2
devices run faster than on one (docs/scaling.md).  A seed whose loss turns
non-finite beyond `train.nonfinite_skips` freezes at its last good state; the others go on.

  result = sweep.train_seeds(config, seeds=[0, 1, 2])
  result.params            # the parameter pytree, every leaf stacked: [K, ...]
  result.diverged_at       # [K] int: the step that stopped a seed, −1 if none
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np

from loopicl import config as config_lib, loop


class SweepResult(NamedTuple):
  """What `train_seeds` returns (host numpy arrays).

  params:       the parameter pure-dict, each leaf [K, ...] (the last good state of each seed).
  diverged_at:  [K] int64, the step that stopped a seed (more than `train.nonfinite_skips`
                non-finite steps in a row), −1 if none.
  skipped:      [K] int64, non-finite steps skipped (state unchanged) before any stop.
  final_loss:   [K] mean training loss of each seed over its last chunk (NaN-free only if alive).
  loss_curve:   [K, chunks] mean training loss per chunk.
  model_def:    step.ModelDef: model_def.merge(params of one seed) is that seed's model.
  wall_s:       seconds spent training (compilation included).
  """
  params: dict
  diverged_at: np.ndarray
  skipped: np.ndarray
  final_loss: np.ndarray
  loss_curve: np.ndarray
  model_def: object
  wall_s: float


def train_seeds(config, seeds, *, log: Callable[[str], None] | None = None,
                log_every_s: float = 30.0) -> SweepResult:
  """Trains `config` once per seed in `seeds`, all seeds in one vmapped program.

  config.train.seed is ignored (the seeds replace it).  `log` (if given) gets a progress line at
  most every `log_every_s` seconds.  Raises errors.ConfigError for a bad config.
  """
  config_lib.validate(config)
  r = loop.train(config, seeds, None, log=log or (lambda *a: None), log_every_s=log_every_s)
  curve = r.loss_curve
  return SweepResult(params=r.params, diverged_at=r.diverged_at, skipped=r.skipped,
                     final_loss=curve[:, -1] if curve.size else np.full(len(seeds), np.nan),
                     loss_curve=curve, model_def=r.model_def, wall_s=r.wall_s)


def seed_params(result, k: int) -> dict:
  """The parameter pure-dict of the k-th seed of a sweep."""
  return jax.tree.map(lambda leaf: np.asarray(leaf[k]), result.params)


def seed_model(result, k: int):
  """The NNX model of the k-th seed of a sweep."""
  return result.model_def.merge(seed_params(result, k))
