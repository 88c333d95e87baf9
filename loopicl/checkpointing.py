"""Orbax checkpoints that are verified on restore.

Orbax does not checksum what it writes: a few overwritten bytes restore silently as garbage, and
an empty or partial step folder is listed as the latest step.  So each checkpoint stores, beside
the train state, a SHA-256 of every array (bytes, shape and dtype, in tree order).  `restore_latest`
walks the steps from the newest, skips any that fails to restore or to verify (with a warning that
names the step), and moves the bad folders aside into `<workdir>/checkpoints_corrupt/` so that a
later save at the same step can never collide with them — nothing is deleted.

Layout: `<directory>/<step>/{state,checksum}` (Orbax's own, one folder per saved step).

Multi-host: every process calls `save` and `restore_latest` with the same arguments (Orbax
synchronises them).  The state goes to Orbax as the jax.Arrays themselves, never as host copies:
Orbax then writes each shard once (replicated arrays from one replica; arrays sharded across hosts
from the host that holds each piece), where a host copy per process would have every process
write, or fail for arrays no single process holds.  The checksum is of the global values, so
each process computes the same one; the small JSON beside it is written by process 0.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from loopicl import distributed


def tree_checksum(tree) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes, in tree-flatten order."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = distributed.host_value(leaf)  # the global value, also for arrays sharded across hosts
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class Checkpointer:
  """A CheckpointManager over `directory` that saves a checksum with every state."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = self._new_manager()

  def _new_manager(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "checksum"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Saves `state` (a pytree of arrays) at `step`, synchronously, with its checksum.

    On several hosts every process must call this (see the module docstring).
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        checksum=ocp.args.JsonSave({"sha256": tree_checksum(state), "step": int(step),
                                    "time": time.time()})), force=True)
    self._manager.wait_until_finished()

  def _restore(self, step: int, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), checksum=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["checksum"]
    if not isinstance(meta, dict) or "sha256" not in meta:
      raise ValueError("no checksum stored")
    if tree_checksum(state) != meta["sha256"]:
      raise ValueError("checksum mismatch (the saved arrays were modified)")
    # Orbax may restore into a different container type; keep the target's tree structure.
    return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(state))

  def restore_latest(self, target, log=print, quarantine: bool = True):
    """(step, state) of the newest checkpoint that restores and verifies; (None, None) if none.

    `target` is a pytree with the expected structure, shapes and dtypes.  With `quarantine`
    (training, which will save again) unusable step folders are moved aside; readers pass False
    and leave the run directory exactly as they found it.
    """
    bad = []
    found = (None, None)
    for step in reversed(self.all_steps()):
      try:
        found = (step, self._restore(step, target))
        break
      except Exception as e:  # any failure to read means: not a usable checkpoint
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        warnings.warn(f"checkpoint at step {step} is unusable ({reason}); trying an older one",
                      stacklevel=2)
        log(f"warning: checkpoint at step {step} is unusable ({reason}); trying an older one")
        bad.append(step)
    if bad and quarantine:
      self._quarantine(bad, log)
    return found

  def _quarantine(self, steps, log):
    """Moves unusable step folders out of Orbax's directory (never deletes them)."""
    self._manager.close()
    target_root = self.directory.rstrip("/") + "_corrupt"
    os.makedirs(target_root, exist_ok=True)
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        dst = os.path.join(target_root, f"{step}.{int(time.time() * 1000)}")
        shutil.move(src, dst)
        log(f"moved unusable checkpoint {step} to {os.path.relpath(dst, os.path.dirname(self.directory))}")
    self._manager = self._new_manager()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
